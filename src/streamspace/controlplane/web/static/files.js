// The viewer's Files panel: browse the session's home, download a file or a folder (zip),
// upload with a progress bar (button, or files dropped onto the remote screen) into ~/Uploads.
import { ApiError, authHeaders, get, post, qs, refreshTokens } from "./api.js";
import { h, showError, toast } from "./ui.js";

const UPLOADS = "Uploads";

function sizeText(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

/** PUT the file as the raw body; XMLHttpRequest because fetch reports no upload progress. */
function putWithProgress(url, file, onProgress, retry = true) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, { detail: "the upload was interrupted" }));
    xhr.onload = async () => {
      if (xhr.status === 401 && retry && (await refreshTokens(authHeaders().Authorization?.slice(7)))) {
        putWithProgress(url, file, onProgress, false).then(resolve, reject);
        return;
      }
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body || { detail: `upload failed (HTTP ${xhr.status})` }));
    };
    xhr.send(file);
  });
}

/** Build the panel; returns {button, panel, dispose}. `dropTarget` takes dropped files. */
export function filesPanel(sessionId, dropTarget) {
  const base = `/api/v1/sessions/${sessionId}/files`;
  let cwd = "";
  const crumbs = h("nav", { class: "files-crumbs", "aria-label": "Folder", dataset: { testid: "files-path" } });
  const list = h("ul", { class: "files-list", dataset: { testid: "files-list" } });
  const progress = h("progress", { max: 1, value: 0, dataset: { testid: "upload-progress" }, hidden: true });
  const progressText = h("span", { class: "muted", role: "status", "aria-live": "polite", dataset: { testid: "upload-status" } });
  const picker = h("input", { type: "file", multiple: true, hidden: true, dataset: { testid: "upload-input" } });
  picker.addEventListener("change", () => {
    upload([...picker.files]);
    picker.value = "";
  });

  const panel = h(
    "aside",
    { class: "files-panel", id: "files-panel", "aria-label": "Files", hidden: true, dataset: { testid: "files-panel" } },
    h(
      "div",
      { class: "panel-head" },
      h("h2", {}, "Files"),
      h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => toggle(false), "aria-label": "Close the files panel" }, "Close"),
    ),
    h(
      "div",
      { class: "files-actions" },
      h("button", { type: "button", class: "btn btn-primary btn-small", dataset: { testid: "upload-button" }, onclick: () => picker.click() }, "Upload…"),
      h("button", { type: "button", class: "btn btn-small", dataset: { testid: "download-folder" }, onclick: () => download(cwd, true) }, "Download folder"),
      picker,
    ),
    h("p", { class: "muted files-hint" }, "Uploads (or files dropped onto the screen) go to ~/Uploads."),
    progress,
    progressText,
    crumbs,
    list,
  );
  const button = h(
    "button",
    {
      type: "button",
      class: "btn btn-bar",
      "aria-expanded": "false",
      "aria-controls": "files-panel",
      title: "Files (Ctrl+Alt+Shift+F)",
      dataset: { testid: "toggle-files" },
      onclick: () => toggle(),
    },
    "Files",
  );

  function toggle(force) {
    const open = force === undefined ? panel.hidden : force;
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (open) browse(cwd);
  }

  async function browse(path) {
    try {
      const page = await get(`${base}${qs({ path, sort: "type", limit: 1000 })}`);
      cwd = path;
      renderCrumbs();
      list.replaceChildren(
        ...page.items.map((e) =>
          h(
            "li",
            { class: "files-item", dataset: { testid: "files-item", name: e.name, type: e.type } },
            e.type === "dir"
              ? h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => browse(e.path) }, `${e.name}/`)
              : h("span", {}, e.name),
            h("span", { class: "muted" }, e.type === "file" ? sizeText(e.size) : e.type === "dir" ? "" : e.type),
            e.type === "file" || e.type === "dir"
              ? h("button", { type: "button", class: "btn btn-small", dataset: { testid: "download" }, "aria-label": `Download ${e.name}`, onclick: () => download(e.path, e.type === "dir") }, "Download")
              : null,
          ),
        ),
      );
      if (!page.items.length) list.replaceChildren(h("li", { class: "muted" }, "This folder is empty."));
    } catch (err) {
      if (err.status === 404 && path) return browse("");
      showError(err);
    }
  }

  function renderCrumbs() {
    const parts = cwd ? cwd.split("/") : [];
    const items = [h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => browse("") }, "~")];
    parts.forEach((p, i) => {
      const target = parts.slice(0, i + 1).join("/");
      items.push(" / ", h("button", { type: "button", class: "btn btn-ghost btn-small", onclick: () => browse(target) }, p));
    });
    crumbs.replaceChildren(...items);
  }

  // The browser's download manager fetches a single-use link and writes the file to disk as it
  // arrives (fetching it here would hold all of it in the tab); the server names the file.
  async function download(path, folder) {
    try {
      const link = await post(`${base}/link${qs({ path })}`);
      const name = (path.split("/").pop() || "home") + (folder ? ".zip" : "");
      const a = h("a", { href: link.url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
    } catch (err) {
      showError(err);
    }
  }

  async function upload(files) {
    if (!files.length) return;
    progress.hidden = false;
    for (const file of files) {
      progress.value = 0;
      progressText.textContent = `Uploading ${file.name}…`;
      try {
        await putWithProgress(`${base}/content${qs({ path: `${UPLOADS}/${file.name}` })}`, file, (f) => {
          progress.value = f;
          progressText.textContent = `Uploading ${file.name}: ${Math.round(f * 100)} %`;
        });
        progress.value = 1;
        progressText.textContent = `Uploaded ${file.name} to ~/${UPLOADS}`;
        toast(`Uploaded ${file.name} to ~/${UPLOADS}`);
      } catch (err) {
        progressText.textContent = `Upload of ${file.name} failed`;
        showError(err);
      }
    }
    if (!panel.hidden) browse(cwd === "" || cwd === UPLOADS ? cwd : cwd);
  }

  const onDragOver = (e) => {
    if (!e.dataTransfer?.types?.includes("Files")) return;
    e.preventDefault();
    dropTarget.classList.add("drop-active");
  };
  const onDragLeave = () => dropTarget.classList.remove("drop-active");
  const onDrop = (e) => {
    if (!e.dataTransfer?.files?.length) return;
    e.preventDefault();
    dropTarget.classList.remove("drop-active");
    if (panel.hidden) toggle(true);
    upload([...e.dataTransfer.files]);
  };
  dropTarget.addEventListener("dragover", onDragOver);
  dropTarget.addEventListener("dragleave", onDragLeave);
  dropTarget.addEventListener("drop", onDrop);

  return {
    button,
    panel,
    toggle,
    dispose() {
      dropTarget.removeEventListener("dragover", onDragOver);
      dropTarget.removeEventListener("dragleave", onDragLeave);
      dropTarget.removeEventListener("drop", onDrop);
    },
  };
}
