{{/* The chart's name, or nameOverride. */}}
{{- define "loyalty.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: fullnameOverride, else release-chart (once). */}}
{{- define "loyalty.fullname" -}}
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

{{/* A component's resource name, e.g. release-loyalty-balance. */}}
{{- define "loyalty.componentName" -}}
{{- printf "%s-%s" (include "loyalty.fullname" .root) .component | trunc 54 | trimSuffix "-" }}
{{- end }}

{{- define "loyalty.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "loyalty.labels" -}}
helm.sh/chart: {{ include "loyalty.chart" . }}
{{ include "loyalty.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loyalty
{{- end }}

{{- define "loyalty.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loyalty.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one component; call with (dict "root" $ "component" "balance"). */}}
{{- define "loyalty.componentLabels" -}}
{{ include "loyalty.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loyalty.componentSelectorLabels" -}}
{{ include "loyalty.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "loyalty.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loyalty.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loyalty.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret holding the Redis URL(s). */}}
{{- define "loyalty.secretName" -}}
{{- default (printf "%s-redis" (include "loyalty.fullname" .)) .Values.redis.existingSecret }}
{{- end }}

{{/* Restricted pod security: non-root, seccomp RuntimeDefault. */}}
{{- define "loyalty.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Restricted container security: read-only root, no escalation, no capabilities. */}}
{{- define "loyalty.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container ports, probes and lifecycle shared by every serving container. */}}
{{- define "loyalty.serving" -}}
ports:
  - name: grpc
    containerPort: {{ .Values.ports.grpc }}
    protocol: TCP
  - name: metrics
    containerPort: {{ .Values.ports.metrics }}
    protocol: TCP
{{- if .Values.tls.enabled }}
  - name: health
    containerPort: {{ .Values.ports.health }}
    protocol: TCP
{{- end }}
{{- $probePort := ternary .Values.ports.health .Values.ports.grpc .Values.tls.enabled }}
startupProbe:
  grpc:
    port: {{ $probePort }}
    service: liveness
  periodSeconds: {{ .Values.probes.startup.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.startup.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ $probePort }}
    service: liveness
  periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ $probePort }}
    service: ""
  periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
  successThreshold: {{ .Values.probes.readiness.successThreshold }}
lifecycle:
  preStop:
    sleep:
      seconds: {{ .Values.lifecycle.preStopSleepSeconds }}
{{- end }}

{{/* Fails rendering when the kubelet would kill a pod before its drain ends. */}}
{{- define "loyalty.checkGrace" -}}
{{- $needed := add .Values.config.server.gracePeriodSeconds .Values.lifecycle.preStopSleepSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.server.gracePeriodSeconds + lifecycle.preStopSleepSeconds (%v)" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}

{{/* The services this release runs, in a fixed order. */}}
{{- define "loyalty.serviceNames" -}}
identity balance promotion segmentation reporting
{{- end }}

{{/* Peer URL of a service: its headless Service, balanced per call by the caller. */}}
{{- define "loyalty.peerURL" -}}
{{- printf "%s://%s-headless:%v" (ternary "https" "http" .root.Values.tls.enabled) (include "loyalty.componentName" (dict "root" .root "component" .component)) .root.Values.ports.grpc }}
{{- end }}

{{/* Volumes of the config file and a writable /tmp. */}}
{{- define "loyalty.configVolumeMounts" -}}
- name: config
  mountPath: /etc/loyalty
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Where serving pods read the TLS Secret, with tls.enabled. */}}
{{- define "loyalty.tlsVolumeMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/loyalty-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* The TLS Secret's volume, with tls.enabled. */}}
{{- define "loyalty.tlsVolume" -}}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt" }}
{{- end }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
{{- end }}
{{- end }}

{{/* A list of strings as TOML array items: "a", "b". */}}
{{- define "loyalty.tomlStrings" -}}
{{- range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s | quote }}{{ end }}
{{- end }}

{{/* Environment every serving container gets: the Redis URL(s) from the Secret. */}}
{{- define "loyalty.authSecretName" -}}
{{- default (printf "%s-auth" (include "loyalty.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The service key every pod presents to the others (docs/security.md). */}}
{{- define "loyalty.authEnv" -}}
- name: LOYALTY_AUTH__SERVICE_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "loyalty.authSecretName" . }}
      key: serviceKey
{{- end }}

{{- define "loyalty.secretEnv" -}}
{{ include "loyalty.authEnv" . }}
{{- if eq .Values.profile "microservices" }}
- name: LOYALTY_STORAGE__REDIS__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "loyalty.secretName" . }}
      key: url
{{- if or .Values.redis.clusterNodes .Values.redis.existingSecret }}
- name: LOYALTY_STORAGE__REDIS__CLUSTER_NODES
  valueFrom:
    secretKeyRef:
      name: {{ include "loyalty.secretName" . }}
      key: clusterNodes
      optional: {{ not .Values.redis.clusterNodes }}
{{- end }}
{{- end }}
{{- end }}

{{/* The pods' components this release runs: "all-in-one" (dev) or the enabled services. */}}
{{- define "loyalty.components" -}}
{{- if eq .Values.profile "dev" }}
{{- print "all-in-one" }}
{{- else }}
{{- $names := list }}
{{- range $name := splitList " " (include "loyalty.serviceNames" .) }}
{{- if (index $.Values.services $name).enabled }}
{{- $names = append $names $name }}
{{- end }}
{{- end }}
{{- join " " $names }}
{{- end }}
{{- end }}

{{/* config.toml of every process, from `config`, `redis` and `scylla` values. */}}
{{- define "loyalty.configToml" -}}
# Rendered by the chart from `config`, `redis` and `scylla` values. The Redis URL comes
# from the Secret as LOYALTY_STORAGE__REDIS__URL.
listen = "0.0.0.0:{{ .Values.ports.grpc }}"
data_dir = "/data"

[log]
format = {{ .Values.config.log.format | quote }}
filter = {{ .Values.config.log.filter | quote }}

[server]
grace_period_secs = {{ .Values.config.server.gracePeriodSeconds | int }}
request_timeout_secs = {{ .Values.config.server.requestTimeoutSeconds | int }}
max_message_bytes = {{ .Values.config.server.maxMessageBytes | int }}
max_concurrent_streams = {{ .Values.config.server.maxConcurrentStreams | int }}
health_interval_secs = {{ .Values.config.server.healthIntervalSeconds | int }}
metrics_listen = "0.0.0.0:{{ .Values.ports.metrics }}"
{{- if .Values.tls.enabled }}
health_listen = "0.0.0.0:{{ .Values.ports.health }}"

[tls]
cert_file = "/etc/loyalty-tls/tls.crt"
key_file = "/etc/loyalty-tls/tls.key"
peer_ca_file = "/etc/loyalty-tls/ca.crt"
metrics = {{ .Values.tls.metrics }}
{{- if ne .Values.tls.clientCertificates "none" }}
client_ca_file = "/etc/loyalty-tls/ca.crt"
require_client_cert = {{ eq .Values.tls.clientCertificates "required" }}
{{- end }}
{{- end }}

[peers]
timeout_ms = {{ .Values.config.peers.timeoutMs | int }}
dns_refresh_ms = {{ .Values.config.peers.dnsRefreshMs | int }}
{{- if eq .Values.profile "microservices" }}
{{- range $name := splitList " " (include "loyalty.serviceNames" .) }}
{{- if (index $.Values.services $name).enabled }}
{{ $name }} = {{ include "loyalty.peerURL" (dict "root" $ "component" $name) | quote }}
{{- end }}
{{- end }}
{{- end }}

[storage]
backend = {{ ternary "scylla" "embedded" (eq .Values.profile "microservices") | quote }}

[storage.scylla]
nodes = [{{ include "loyalty.tomlStrings" .Values.scylla.nodes }}]
keyspace = {{ .Values.scylla.keyspace | quote }}
replication = {{ .Values.scylla.replication | quote }}
keyspace_options = {{ .Values.scylla.keyspaceOptions | quote }}
connect_timeout_ms = {{ .Values.scylla.connectTimeoutMs | int }}
request_timeout_ms = {{ .Values.scylla.requestTimeoutMs | int }}

[tracing]
{{- with .Values.config.tracing.otlpEndpoint }}
otlp_endpoint = {{ . | quote }}
{{- end }}
sample_ratio = {{ .Values.config.tracing.sampleRatio }}

[auth]
mode = "required"
cache_ttl_secs = {{ .Values.config.auth.cacheTtlSeconds | int }}

[rate_limits]
{{- with .Values.config.rateLimits }}
per_key = {{ .perKey | float64 }}
per_tenant = {{ .perTenant | float64 }}
burst_secs = {{ .burstSeconds | float64 }}
{{- if .tenants }}

[rate_limits.tenants]
{{- range $tenant, $rate := .tenants }}
{{ $tenant | quote }} = {{ $rate | float64 }}
{{- end }}
{{- end }}
{{- end }}

[metrics]
{{- with .Values.config.metrics.otlpEndpoint }}
otlp_endpoint = {{ . | quote }}
{{- end }}
export_interval_ms = {{ .Values.config.metrics.exportIntervalMs | int }}

[identity]
store = {{ ternary (default "embedded" .Values.services.identity.store) "embedded" (eq .Values.profile "microservices") | quote }}
default_region = {{ .Values.config.identity.defaultRegion | quote }}
scrub_interval_secs = {{ .Values.config.identity.scrubIntervalSecs | int }}

[balance]
expiry_interval_ms = {{ .Values.config.balance.expiryIntervalMs | int }}
expiry_batch = {{ .Values.config.balance.expiryBatch | int }}
hot_record_retention_secs = {{ .Values.config.balance.hotRecordRetentionSecs | int }}

[promotion]
store = {{ ternary (default "embedded" .Values.services.promotion.store) "embedded" (eq .Values.profile "microservices") | quote }}

[segmentation]
store = {{ ternary (default "embedded" .Values.services.segmentation.store) "embedded" (eq .Values.profile "microservices") | quote }}
reevaluate_interval_ms = {{ .Values.config.segmentation.reevaluateIntervalMs | int }}
rfm_interval_ms = {{ .Values.config.segmentation.rfmIntervalMs | int }}
scrub_interval_secs = {{ .Values.config.segmentation.scrubIntervalSecs | int }}
{{- end }}
