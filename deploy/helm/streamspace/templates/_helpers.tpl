{{/* Names: `<release>-<chart>` cut to 63 characters (a DNS label), unless overridden. */}}
{{- define "streamspace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "streamspace.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; `component` is added per object. */}}
{{- define "streamspace.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "streamspace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: call with (dict "root" $ "component" "controlplane"). */}}
{{- define "streamspace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamspace.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "streamspace.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "streamspace.sessionsNamespace" -}}
{{- default .Release.Namespace .Values.agent.sessionsNamespace -}}
{{- end -}}

{{- define "streamspace.secretName" -}}
{{- default (printf "%s-controlplane" (include "streamspace.fullname" .)) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "streamspace.joinTokenSecret" -}}
{{- default (printf "%s-agent-join" (include "streamspace.fullname" .)) .Values.agent.joinTokenSecret -}}
{{- end -}}

{{/* Whether the control plane gets a Redis URL (bundled, external, or in an existing Secret). */}}
{{- define "streamspace.hasRedis" -}}
{{- if or .Values.redis.bundled .Values.externalRedis.url (and .Values.secrets.existingSecret (gt (int .Values.controlPlane.replicas) 1)) -}}true{{- end -}}
{{- end -}}

{{/*
The agent's rights in the sessions namespace: exactly the API calls the kubernetes backend
(src/streamspace/agent/backends/kubernetes) makes, and nothing else. This is the one list;
the Role renders it and docs/kubernetes.md ("RBAC") explains each line. A call outside it is
refused by the API server with 403, which the backend reports naming the verb and resource.
*/}}
{{- define "streamspace.agentRules" -}}
# Session pods: the watch cache lists and watches them; start creates them, stop and hibernate
# delete them.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete]
# One Secret per session holds its VNC password: watched like the pods, made at start, deleted
# at stop.
- apiGroups: [""]
  resources: [secrets]
  verbs: [list, watch, create, delete]
# The persistent homes, one per user and template: created, or read back when they exist.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, create]
# The agent's two NetworkPolicies (VNC only from the agent; no egress for sessions without
# network): created once, updated when they exist already.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [create, update]
{{- end -}}

{{/*
Cluster-wide, and only with agent.storageClassCheck: reading the StorageClass the homes ask for,
so a missing class fails a session at once instead of leaving its claim Pending. Without it the
backend skips the check.
*/}}
{{- define "streamspace.agentClusterRules" -}}
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get]
{{- end -}}

{{/* Pod and container security settings shared by every workload of the chart. */}}
{{- define "streamspace.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "streamspace.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}
