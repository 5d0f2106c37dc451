{{/*
Names, labels, images and RBAC rules shared by the templates.
*/}}

{{- define "caffe-serving.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The object name prefix. Truncated so that "<fullname>-operator" and "<fullname>-gateway" stay within
the 63 characters of a DNS label.
*/}}
{{- define "caffe-serving.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "caffe-serving.operatorName" -}}
{{- printf "%s-operator" (include "caffe-serving.fullname" .) }}
{{- end }}

{{- define "caffe-serving.gatewayName" -}}
{{- printf "%s-gateway" (include "caffe-serving.fullname" .) }}
{{- end }}

{{- define "caffe-serving.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "caffe-serving.labels" -}}
helm.sh/chart: {{ include "caffe-serving.chart" . }}
app.kubernetes.io/name: {{ include "caffe-serving.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: caffe-serving
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: include with (dict "root" $ "component" "operator"). */}}
{{- define "caffe-serving.selectorLabels" -}}
app.kubernetes.io/name: {{ include "caffe-serving.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "caffe-serving.componentLabels" -}}
{{ include "caffe-serving.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* repository[:tag][@digest] from an image dict; the tag defaults to the chart's appVersion. */}}
{{- define "caffe-serving.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion | toString }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "caffe-serving.operatorImage" -}}
{{- include "caffe-serving.image" (dict "root" . "image" .Values.operator.image) }}
{{- end }}

{{- define "caffe-serving.gatewayImage" -}}
{{- if .Values.gateway.image.repository }}
{{- include "caffe-serving.image" (dict "root" . "image" .Values.gateway.image) }}
{{- else }}
{{- include "caffe-serving.operatorImage" . }}
{{- end }}
{{- end }}

{{- define "caffe-serving.serverImage" -}}
{{- include "caffe-serving.image" (dict "root" . "image" .Values.server.image) }}
{{- end }}

{{- define "caffe-serving.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "caffe-serving.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "caffe-serving.gatewayServiceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "caffe-serving.gatewayName" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* True (non-empty) when the operator and gateway watch every namespace. */}}
{{- define "caffe-serving.clusterWide" -}}
{{- if eq .Values.watch.scope "cluster" }}true{{- end }}
{{- end }}

{{/* The one namespace watched with scope "namespace". */}}
{{- define "caffe-serving.watchNamespace" -}}
{{- default .Release.Namespace .Values.watch.namespace }}
{{- end }}

{{/* `--all-namespaces` or `--namespace NS`, as YAML list items (operator and gateway take both). */}}
{{- define "caffe-serving.watchArgs" -}}
{{- if include "caffe-serving.clusterWide" . }}
- --all-namespaces
{{- else }}
- --namespace
- {{ include "caffe-serving.watchNamespace" . }}
{{- end }}
{{- end }}

{{/* Where clients reach models: the gateway Service (the operator writes it into status.url). */}}
{{- define "caffe-serving.gatewayURL" -}}
{{- $host := printf "%s.%s.svc" (include "caffe-serving.gatewayName" .) .Release.Namespace }}
{{- if eq (int .Values.gateway.service.port) 80 }}
{{- printf "http://%s" $host }}
{{- else }}
{{- printf "http://%s:%d" $host (int .Values.gateway.service.port) }}
{{- end }}
{{- end }}

{{/*
RBAC: exactly what the components call; tests/cluster/test_e2e.py proves both directions against the API
requests they make (every request allowed, every permission used). The rules go into a Role in the
watched namespace, or a ClusterRole with scope "cluster". Nothing else is granted: kopf's scanning
of CRDs and namespaces is off (the operator waits for its CRD by API discovery, which every
authenticated user may read). The operator deletes only children the spec or the chart no longer
asks for (a canary's, a ScaledObject, a NetworkPolicy); everything else goes with its
CaffeModelService (ownerReferences hand it to the garbage collector).
*/}}
{{- define "caffe-serving.operatorRules" -}}
# The CaffeModelServices: kopf lists and watches them and keeps its bookkeeping annotations on them
# (patch); the reconciler reads the current object (get).
- apiGroups: ["caffeserving.io"]
  resources: ["caffemodelservices"]
  verbs: ["get", "list", "watch", "patch"]
# status: conditions, replicas, URL.
- apiGroups: ["caffeserving.io"]
  resources: ["caffemodelservices/status"]
  verbs: ["patch"]
# CaffeServingPools: watched like the models; their status says which pod holds which model.
- apiGroups: ["caffeserving.io"]
  resources: ["caffeservingpools"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["caffeserving.io"]
  resources: ["caffeservingpools/status"]
  verbs: ["patch"]
# The children: the server config, the predictor Service and Deployment. Created, read back,
# watched (a hand edit or a deletion is undone; the Deployment's ready replicas reach the status)
# and patched when the spec changes or they drift. Deleted: only a canary's (spec.canary removed:
# rolled back or promoted); everything else goes with its CR (garbage collection).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# spec.autoscaling: a KEDA ScaledObject per autoscaled model, deleted when the spec drops autoscaling.
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
# Events on the CaffeModelService (created, invalid spec, ready, ...).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# The predictor's EndpointSlices: which pods are not ready, to ask them why (a model that failed
# to load says so on /v2/health/ready; the status then reads ModelLoadFailed with its message).
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list"]
# The model pods of a model that is not ready: a fetch init container that failed (wrong sha256,
# missing object) says why in its termination message; the status then reads ModelFetchFailed. A pod
# no node fits (too many GPUs asked) says why in its PodScheduled condition: Unschedulable.
# Pool pods (CaffeServingPool) are watched (one that dies has its models placed elsewhere) and
# patched: the label pool.caffeserving.io/MODEL says the pod holds MODEL, and selects it into the
# model's Service.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "patch"]
# A NetworkPolicy per model variant (networkPolicy.enabled): created, read back, watched and
# patched like the other children, deleted with a canary. Turned off, the operator only looks for
# those it made while it was on, and deletes them.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
{{- if .Values.networkPolicy.enabled }}
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- else }}
  verbs: ["get", "delete"]
{{- end }}
{{- end }}

{{- /*
The NetworkPolicyPeers allowed into model pods (the operator's CAFFESERVE_NETWORK_POLICY_FROM): the
gateway (it forwards requests), the operator (it asks pods why they are not ready and which
backend serves), and networkPolicy.modelFrom (e.g. Prometheus).
*/}}
{{- define "caffe-serving.modelPeers" -}}
{{- $peers := list -}}
{{- $ns := dict "matchLabels" (dict "kubernetes.io/metadata.name" .Release.Namespace) -}}
{{- if .Values.gateway.enabled -}}
{{- $peers = append $peers (dict "namespaceSelector" $ns "podSelector" (dict "matchLabels" (include "caffe-serving.selectorLabels" (dict "root" . "component" "gateway") | fromYaml))) -}}
{{- end -}}
{{- $peers = append $peers (dict "namespaceSelector" $ns "podSelector" (dict "matchLabels" (include "caffe-serving.selectorLabels" (dict "root" . "component" "operator") | fromYaml))) -}}
{{- range .Values.networkPolicy.modelFrom -}}
{{- $peers = append $peers . -}}
{{- end -}}
{{- toJson $peers -}}
{{- end }}

{{- define "caffe-serving.gatewayRules" -}}
# The gateway finds each model's ready pods in the EndpointSlices of its predictor Service.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
{{- end }}
