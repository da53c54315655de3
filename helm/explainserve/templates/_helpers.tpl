{{/* Names and labels. */}}
{{- define "explainserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "explainserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "explainserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "explainserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "explainserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "explainserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: explainserve
{{- end }}

{{- define "explainserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "explainserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "explainserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Token authorisation: on unless explicitly disabled (tokenAuthorization: false, or
     extraConfig.disable_token_authorization) together with insecure: true. */}}
{{- define "explainserve.tokenAuth" -}}
{{- $extra := index .Values.torchserve.extraConfig "disable_token_authorization" | default "false" | toString | lower | trim }}
{{- if not .Values.torchserve.tokenAuthorization }}
{{- if not .Values.insecure }}
{{- fail "torchserve.tokenAuthorization: false disables TorchServe's token authorisation; set insecure: true as well to confirm" }}
{{- end }}
{{- else if ne $extra "false" }}
{{- if not .Values.insecure }}
{{- fail "torchserve.extraConfig.disable_token_authorization disables TorchServe's token authorisation; set insecure: true as well to confirm" }}
{{- end }}
{{- else -}}
true
{{- end }}
{{- end }}

{{/* The sidecar's TLS and API keys: on unless disabled together with insecure: true. */}}
{{- define "explainserve.tls" -}}
{{- if .Values.sidecar.tls.enabled -}}
true
{{- else if not .Values.insecure }}
{{- fail "sidecar.tls.enabled: false serves the Explain API (and its API keys) in clear text; set insecure: true as well to confirm" }}
{{- end }}
{{- end }}

{{- define "explainserve.auth" -}}
{{- if .Values.sidecar.auth.enabled -}}
true
{{- else if not .Values.insecure }}
{{- fail "sidecar.auth.enabled: false serves every caller that reaches the Explain API; set insecure: true as well to confirm" }}
{{- end }}
{{- end }}

{{- define "explainserve.tlsSecret" -}}
{{- default (printf "%s-tls" (include "explainserve.fullname" .)) .Values.sidecar.tls.secretName }}
{{- end }}

{{- define "explainserve.authSecret" -}}
{{- default (printf "%s-api-keys" (include "explainserve.fullname" .)) .Values.sidecar.auth.secretName }}
{{- end }}

{{/* Seconds a pod may take to stop: the sidecar's preStop wait and drain, then TorchServe's stop. */}}
{{- define "explainserve.terminationGrace" -}}
{{- $needed := add .Values.sidecar.preStopSeconds .Values.sidecar.drainSeconds 15 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $needed }}
{{- else if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds %v is shorter than sidecar.preStopSeconds + sidecar.drainSeconds + 15 = %v: calls in flight would be cut" .Values.terminationGracePeriodSeconds $needed) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* Where TorchServe writes key_file.json (its working directory) and the sidecar reads it. */}}
{{- define "explainserve.keyDir" -}}/run/torchserve{{- end }}

{{/* The container security context every container of the chart uses. */}}
{{- define "explainserve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "explainserve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The claim backing models or stores: an existing one or the chart's. Argument: (list $ "models"). */}}
{{- define "explainserve.claimName" -}}
{{- $root := index . 0 }}{{- $key := index . 1 }}
{{- $pvc := (index $root.Values $key).pvc }}
{{- default (printf "%s-%s" (include "explainserve.fullname" $root) $key) $pvc.existingClaim }}
{{- end }}

{{/* The sidecar container, shared by the classic and the native form. */}}
{{- define "explainserve.sidecar" -}}
- name: sidecar
  image: {{ include "explainserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  command: [explainserve, sidecar]
  args:
    - --listen=0.0.0.0:{{ .Values.sidecar.port }}
    - --metrics-port={{ .Values.sidecar.metricsPort }}
    - --metrics-address=0.0.0.0
    - --torchserve=127.0.0.1:7070
    - --torchserve-management=127.0.0.1:7071
    - --store-dir=/stores
    {{- if include "explainserve.tokenAuth" . }}
    - --token-file={{ include "explainserve.keyDir" . }}/key_file.json
    {{- end }}
    {{- if .Values.sidecar.metricsPerClass }}
    - --metrics-per-class
    {{- end }}
    - --health-listen=0.0.0.0:{{ .Values.sidecar.healthPort }}
    {{- if include "explainserve.tls" . }}
    - --tls-cert=/etc/explainserve/tls/tls.crt
    - --tls-key=/etc/explainserve/tls/tls.key
    {{- if .Values.sidecar.tls.clientCA.enabled }}
    - --tls-client-ca=/etc/explainserve/client-ca/{{ .Values.sidecar.tls.clientCA.key }}
    {{- end }}
    {{- end }}
    {{- if include "explainserve.auth" . }}
    - --auth-keys=/etc/explainserve/auth/{{ .Values.sidecar.auth.key }}
    {{- else }}
    - --allow-unauthenticated
    {{- end }}
    {{- if .Values.sidecar.reflection }}
    - --reflection
    {{- end }}
    - --max-concurrent-requests={{ .Values.sidecar.maxConcurrentRequests }}
    - --max-queued-requests={{ .Values.sidecar.maxQueuedRequests }}
    - --max-connection-age={{ .Values.sidecar.maxConnectionAgeSeconds }}
    - --drain-seconds={{ .Values.sidecar.drainSeconds }}
    {{- range .Values.sidecar.extraArgs }}
    - {{ . | quote }}
    {{- end }}
  ports:
    - name: grpc
      containerPort: {{ .Values.sidecar.port }}
      protocol: TCP
    - name: metrics
      containerPort: {{ .Values.sidecar.metricsPort }}
      protocol: TCP
    - name: health
      containerPort: {{ .Values.sidecar.healthPort }}
      protocol: TCP
  env:
    - name: HOME
      value: /tmp
  {{- /* Both probes ask the plaintext health port (the kubelet's gRPC probes cannot speak TLS).
         Readiness: the Explain API's status, SERVING only while TorchServe answers. Liveness:
         "liveness", SERVING whenever the event loop answers (the "" status follows TorchServe,
         and restarting the sidecar while TorchServe loads its models would not help); a stuck
         loop misses the timeout. */}}
  livenessProbe:
    grpc:
      port: {{ .Values.sidecar.healthPort }}
      service: liveness
    {{- toYaml .Values.sidecar.livenessProbe | nindent 4 }}
  readinessProbe:
    grpc:
      port: {{ .Values.sidecar.healthPort }}
      service: explainserve.v1.Explainer
    {{- toYaml .Values.sidecar.readinessProbe | nindent 4 }}
  {{- if .Values.sidecar.preStopSeconds }}
  lifecycle:
    # Keep serving while the endpoints forget this pod; SIGTERM then drains (--drain-seconds).
    preStop:
      exec:
        command: [sleep, "{{ .Values.sidecar.preStopSeconds }}"]
  {{- end }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- include "explainserve.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - name: stores
      mountPath: /stores
      readOnly: true
    - name: tmp
      mountPath: /tmp
    {{- if include "explainserve.tokenAuth" . }}
    - name: torchserve-keys
      mountPath: {{ include "explainserve.keyDir" . }}
      readOnly: true
    {{- end }}
    {{- /* Secrets mounted whole (no subPath), so that the kubelet's updates reach the files. */}}
    {{- if include "explainserve.tls" . }}
    - name: tls
      mountPath: /etc/explainserve/tls
      readOnly: true
    {{- if .Values.sidecar.tls.clientCA.enabled }}
    - name: client-ca
      mountPath: /etc/explainserve/client-ca
      readOnly: true
    {{- end }}
    {{- end }}
    {{- if include "explainserve.auth" . }}
    - name: api-keys
      mountPath: /etc/explainserve/auth
      readOnly: true
    {{- end }}
{{- end }}

{{/* An initContainer copying data from an image into a volume. Argument: (list $ "models"). */}}
{{- define "explainserve.copyInitContainer" -}}
{{- $root := index . 0 }}{{- $key := index . 1 }}
{{- $source := (index $root.Values $key).initContainer }}
{{- if not $source.image }}
{{- fail (printf "%s.initContainer.image is required when %s.source is initContainer" $key $key) }}
{{- end }}
- name: copy-{{ $key }}
  image: {{ $source.image }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command: [sh, -c, 'cp -R "$SOURCE"/. "$TARGET"/']
  env:
    - name: SOURCE
      value: {{ $source.sourcePath | quote }}
    - name: TARGET
      value: /{{ $key }}
  securityContext:
    {{- include "explainserve.containerSecurityContext" $root | nindent 4 }}
  volumeMounts:
    - name: {{ $key }}
      mountPath: /{{ $key }}
{{- end }}

{{/* The pod volume for models or stores. Argument: (list $ "models"). */}}
{{- define "explainserve.dataVolume" -}}
{{- $root := index . 0 }}{{- $key := index . 1 }}
- name: {{ $key }}
  {{- if eq (index $root.Values $key).source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "explainserve.claimName" (list $root $key) }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
