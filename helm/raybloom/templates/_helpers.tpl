{{/* Names. Kept to 40 characters: KubeRay appends "-head-svc", "-<group>-worker-xxxxx" etc. */}}
{{- define "raybloom.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{- define "raybloom.fullname" -}}
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

{{- define "raybloom.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "raybloom.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: raybloom
{{- end -}}

{{/* selector labels of one component: (dict "ctx" $ "component" "mlflow") */}}
{{- define "raybloom.selectorLabels" -}}
app.kubernetes.io/name: {{ include "raybloom.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "raybloom.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) -}}
{{- end -}}

{{/* The Secret this chart creates for the values it is given (passwords, keys, URLs). */}}
{{- define "raybloom.secretName" -}}
{{- printf "%s-secrets" (include "raybloom.fullname" .) -}}
{{- end -}}

{{- define "raybloom.mlflow.secretName" -}}
{{- default (include "raybloom.secretName" .) .Values.mlflow.auth.existingSecret -}}
{{- end -}}

{{- define "raybloom.postgresql.secretName" -}}
{{- default (include "raybloom.secretName" .) .Values.postgresql.auth.existingSecret -}}
{{- end -}}

{{- define "raybloom.mlflow.url" -}}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "raybloom.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{- define "raybloom.flower.tlsSecret" -}}
{{- default (printf "%s-flower-tls" (include "raybloom.fullname" .)) .Values.flower.tls.existingSecret -}}
{{- end -}}

{{- define "raybloom.flower.keysSecret" -}}
{{- default (printf "%s-supernode-keys" (include "raybloom.fullname" .)) .Values.flower.supernodes.authKeysSecret -}}
{{- end -}}

{{/* Container security context shared by every container of the chart. */}}
{{- define "raybloom.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Pod security context for the pods of the raybloom image. */}}
{{- define "raybloom.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
MLflow client settings for the pods that log runs (Ray head/workers, the Flower SuperLink that runs
the ServerApp): the URL as plain text, the credentials from the Secret.
*/}}
{{- define "raybloom.mlflowClientEnv" -}}
{{- if .Values.mlflow.enabled -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "raybloom.mlflow.url" . | quote }}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ .Values.mlflow.auth.adminUsername | quote }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "raybloom.mlflow.secretName" . }}
      key: mlflow-admin-password
{{- end }}
{{- end -}}

{{/* One Ray pod template: (dict "ctx" $ "container" "ray-head" "group" .Values.ray.head "image" "..." "gpus" 0 "head" true) */}}
{{- define "raybloom.rayPodTemplate" -}}
{{- $ctx := .ctx -}}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "raybloom.labels" $ctx | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  securityContext:
    {{- include "raybloom.podSecurityContext" $ctx | nindent 4 }}
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ .image | quote }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      securityContext:
        {{- include "raybloom.containerSecurityContext" $ctx | nindent 8 }}
      env:
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
        {{- include "raybloom.mlflowClientEnv" $ctx | nindent 8 }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
      {{- end }}
      resources:
        requests:
          {{- toYaml $g.resources.requests | nindent 10 }}
        limits:
          {{- toYaml $g.resources.limits | nindent 10 }}
          {{- if .gpus }}
          nvidia.com/gpu: {{ .gpus | quote }}
          {{- end }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize }}
{{- end -}}

{{/* The RayCluster spec, shared by the RayCluster and by a RayJob that starts its own cluster. */}}
{{- define "raybloom.rayClusterSpec" -}}
{{- $r := .Values.ray -}}
rayVersion: "2.55.1"
{{- /*
Ray token authentication, the KubeRay way (authOptions, KubeRay >= 1.5.1): the operator sets
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from the Secret) on every Ray container, the autoscaler and
the RayJob submitter. Without secretName it generates the token into a Secret named like the cluster.
*/}}
authOptions:
  mode: token
  {{- with $r.auth.existingSecret }}
  secretName: {{ . }}
  {{- end }}
enableInTreeAutoscaling: {{ $r.autoscaling.enabled }}
{{- if $r.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ $r.autoscaling.idleTimeoutSeconds }}
  upscalingMode: {{ $r.autoscaling.upscalingMode }}
  securityContext:
    {{- include "raybloom.containerSecurityContext" . | nindent 4 }}
{{- end }}
headGroupSpec:
  # The head Service (GCS, dashboard/Jobs API on 8265, client) stays inside the cluster:
  # reach the dashboard with `kubectl port-forward`.
  serviceType: ClusterIP
  rayStartParams:
    {{- toYaml $r.head.rayStartParams | nindent 4 }}
  template:
    {{- include "raybloom.rayPodTemplate" (dict "ctx" . "group" $r.head "container" "ray-head" "component" "ray-head" "image" (include "raybloom.image" .) "gpus" 0 "head" true) | nindent 4 }}
workerGroupSpecs:
  - groupName: cpu
    replicas: {{ $r.workers.replicas }}
    minReplicas: {{ $r.workers.minReplicas }}
    maxReplicas: {{ $r.workers.maxReplicas }}
    rayStartParams:
      {{- toYaml $r.workers.rayStartParams | nindent 6 }}
    template:
      {{- include "raybloom.rayPodTemplate" (dict "ctx" . "group" $r.workers "container" "ray-worker" "component" "ray-worker" "image" (include "raybloom.image" .) "gpus" 0 "head" false) | nindent 6 }}
  {{- if $r.gpuWorkers.enabled }}
  {{- $gi := $r.gpuWorkers.image }}
  {{- $img := include "raybloom.image" . }}
  {{- if $gi.repository }}
  {{- $img = printf "%s:%s" $gi.repository (default (toString .Values.image.tag) (toString $gi.tag)) }}
  {{- end }}
  - groupName: gpu
    replicas: {{ $r.gpuWorkers.replicas }}
    minReplicas: {{ $r.gpuWorkers.minReplicas }}
    maxReplicas: {{ $r.gpuWorkers.maxReplicas }}
    rayStartParams:
      {{- toYaml $r.gpuWorkers.rayStartParams | nindent 6 }}
    template:
      {{- include "raybloom.rayPodTemplate" (dict "ctx" . "group" $r.gpuWorkers "container" "ray-worker" "component" "ray-gpu-worker" "image" $img "gpus" $r.gpuWorkers.gpusPerWorker "head" false) | nindent 6 }}
  {{- end }}
{{- end -}}

{{/* Cross-value checks the schema cannot express. */}}
{{- define "raybloom.validate" -}}
{{- $r := .Values.ray -}}
{{- if gt (int $r.workers.minReplicas) (int $r.workers.maxReplicas) -}}
{{- fail "ray.workers.minReplicas must not exceed ray.workers.maxReplicas" -}}
{{- end -}}
{{- if or (lt (int $r.workers.replicas) (int $r.workers.minReplicas)) (gt (int $r.workers.replicas) (int $r.workers.maxReplicas)) -}}
{{- fail "ray.workers.replicas must lie between ray.workers.minReplicas and ray.workers.maxReplicas" -}}
{{- end -}}
{{- if $r.gpuWorkers.enabled -}}
{{- if gt (int $r.gpuWorkers.minReplicas) (int $r.gpuWorkers.maxReplicas) -}}
{{- fail "ray.gpuWorkers.minReplicas must not exceed ray.gpuWorkers.maxReplicas" -}}
{{- end -}}
{{- if or (lt (int $r.gpuWorkers.replicas) (int $r.gpuWorkers.minReplicas)) (gt (int $r.gpuWorkers.replicas) (int $r.gpuWorkers.maxReplicas)) -}}
{{- fail "ray.gpuWorkers.replicas must lie between ray.gpuWorkers.minReplicas and ray.gpuWorkers.maxReplicas" -}}
{{- end -}}
{{- end -}}
{{- if and $r.job.enabled (eq $r.job.cluster "existing") (not $r.enabled) -}}
{{- fail "ray.job.cluster=existing submits to the chart's RayCluster: set ray.enabled=true (or ray.job.cluster=own)" -}}
{{- end -}}
{{- if .Values.mlflow.enabled -}}
{{- $external := or .Values.mlflow.backendStoreUri .Values.mlflow.backendStoreUriSecret.name -}}
{{- if and .Values.postgresql.enabled $external -}}
{{- fail "mlflow.backendStoreUri / mlflow.backendStoreUriSecret.name name an external database: set postgresql.enabled=false" -}}
{{- end -}}
{{- if and (not .Values.postgresql.enabled) (not $external) -}}
{{- fail "postgresql.enabled=false: give mlflow.backendStoreUri (postgresql+psycopg2://...) or mlflow.backendStoreUriSecret.name" -}}
{{- end -}}
{{- if and .Values.mlflow.artifacts.destination (not .Values.mlflow.artifacts.s3.existingSecret) -}}
{{- fail "mlflow.artifacts.destination is an S3 URL: name the Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in mlflow.artifacts.s3.existingSecret" -}}
{{- end -}}
{{- if and .Values.mlflow.artifacts.persistence (gt (int .Values.mlflow.replicas) 1) (not .Values.mlflow.artifacts.destination) (not (has "ReadWriteMany" .Values.mlflow.artifacts.persistence.accessModes)) -}}
{{- fail "mlflow.replicas > 1 with artifacts on a PVC needs mlflow.artifacts.persistence.accessModes [ReadWriteMany] (or an S3 destination)" -}}
{{- end -}}
{{- end -}}
{{- if .Values.flower.enabled -}}
{{- $ports := list (int .Values.flower.superlink.port) (int .Values.flower.proxy.fleetPort) (int .Values.flower.proxy.controlPort) 9099 -}}
{{- if ne (len (uniq $ports)) 4 -}}
{{- fail "flower.superlink.port, flower.proxy.fleetPort and flower.proxy.controlPort must differ from each other and from 9099 (the SuperLink's health port): they share the SuperLink's pod" -}}
{{- end -}}
{{- end -}}
{{- end -}}
