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
# Session pods: the watch cache lists and watches them; start creates, stop/hibernate deletes.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete]
# One Secret per session holds its VNC password (watched, so the agent can authenticate).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, delete]
# The persistent homes: made once per user and template, read back when they exist already.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, create]
# The sessions' NetworkPolicies (VNC only from the agent; no egress without network).
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, update, delete]
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
