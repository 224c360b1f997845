"""The image build plan and inputs hashes, as data: what `streamspace images build` would do."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamspace.images import ImageBuildError, available_images, image_ref
from streamspace.images.catalog import context_hash, plan


def image(root: Path, name: str, containerfile: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "Containerfile").write_text(containerfile)
    return root / name


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    image(tmp_path, "base", "ARG ROOTFS=localhost/streamspace/rootfs:latest\nFROM ${ROOTFS}\n")
    image(tmp_path, "xterm", 'ARG BASE="localhost/streamspace/base:latest"\nFROM $BASE\n')
    image(tmp_path, "alpine", "FROM docker.io/library/alpine:3\n")
    (tmp_path / "notes").mkdir()  # no Containerfile: not an image
    return tmp_path


def test_base_is_listed_first_and_folders_without_containerfile_are_not(tree: Path) -> None:
    assert available_images(tree) == ["base", "alpine", "xterm"]
    assert image_ref("xterm") == "localhost/streamspace/xterm:latest"


def test_plan_builds_parents_first_once(tree: Path) -> None:
    steps = plan(["xterm", "base", "alpine"], tree)
    assert [(s.name, s.parent) for s in steps] == [
        ("rootfs", None),
        ("base", "rootfs"),
        ("xterm", "base"),
        ("alpine", None),  # FROM an image that is not ours: nothing to build first
    ]
    assert steps[0].context is None and steps[2].context == tree / "xterm"


def test_plan_refuses_unknown_names_and_cycles(tree: Path) -> None:
    with pytest.raises(ImageBuildError, match=r"no image named 'nope'.*available: alpine, base"):
        plan(["nope"], tree)
    image(tree, "a", "FROM localhost/streamspace/b:latest\n")
    image(tree, "b", "FROM localhost/streamspace/a:latest\n")
    with pytest.raises(ImageBuildError, match="FROM cycle a -> b -> a"):
        plan(["a"], tree)


def test_inputs_hash_follows_files_modes_and_the_parent(tree: Path) -> None:
    ctx = tree / "xterm"
    first = context_hash(ctx, "p1")
    assert context_hash(ctx, "p1") == first
    assert context_hash(ctx, "p2") != first
    script = ctx / "start.sh"
    script.write_text("echo hi\n")
    with_script = context_hash(ctx, "p1")
    assert with_script != first
    script.chmod(0o755)
    assert context_hash(ctx, "p1") != with_script
