{{/* Namespace of the control plane: fsm.fsmNamespace, else the release namespace. */}}
{{- define "fsm.namespace" -}}
{{ default .Release.Namespace .Values.fsm.fsmNamespace }}
{{- end -}}

{{/* Labels on every object the chart installs (FSM's: `kubectl get ... -l app.kubernetes.io/name=flomesh.io`). */}}
{{- define "fsm.labels" -}}
app.kubernetes.io/name: flomesh.io
app.kubernetes.io/instance: {{ .Values.fsm.meshName }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Image tag: fsm.image.tag, else the chart's appVersion. */}}
{{- define "fsm.imageTag" -}}
{{ .Values.fsm.image.tag | default .Chart.AppVersion | toString }}
{{- end -}}

{{/* <registry>/<name>:<tag> of the control plane image named by the argument's key in fsm.image.name. */}}
{{- define "fsm.image" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- printf "%s/%s:%s" $root.Values.fsm.image.registry (index $root.Values.fsm.image.name $key) (include "fsm.imageTag" $root) -}}
{{- end -}}

{{- define "fsmController.image" -}}{{ include "fsm.image" (list . "fsmController") }}{{- end -}}
{{- define "fsmInjector.image" -}}{{ include "fsm.image" (list . "fsmInjector") }}{{- end -}}
{{- define "fsmSidecarInit.image" -}}{{ include "fsm.image" (list . "fsmSidecarInit") }}{{- end -}}
{{- define "fsmSidecar.image" -}}{{ include "fsm.image" (list . "fsmSidecar") }}{{- end -}}

{{/* Name of the MutatingWebhookConfiguration (fsm-injector --webhook-config-name). */}}
{{- define "fsm.webhookConfigName" -}}
{{ printf "%s-%s" .Values.fsm.webhookConfigNamePrefix .Values.fsm.meshName }}
{{- end -}}

{{/*
Name of the ValidatingWebhookConfiguration of fsm-controller's validating webhook
(fsm-controller --validating-webhook-config-name): FSM's fsm-validator-mesh-<meshName>.
*/}}
{{- define "fsm.validatorWebhookConfigName" -}}
{{ printf "fsm-validator-mesh-%s" .Values.fsm.meshName }}
{{- end -}}

{{/* Names of the cluster-scoped RBAC objects: one set per mesh. */}}
{{- define "fsm.controllerClusterRole" -}}
{{ printf "fsm-controller-%s" .Values.fsm.meshName }}
{{- end -}}
{{- define "fsm.injectorClusterRole" -}}
{{ printf "fsm-injector-%s" .Values.fsm.meshName }}
{{- end -}}

{{/* Address of the ADS server the injected sidecars connect to. */}}
{{- define "fsm.adsAddress" -}}
{{ printf "fsm-controller.%s.svc.cluster.local:15128" (include "fsm.namespace" .) }}
{{- end -}}

{{/* Tracing collector host: fsm.tracing.address, else jaeger.<fsm-namespace>.svc.cluster.local. */}}
{{- define "fsm.tracingAddress" -}}
{{ default (printf "jaeger.%s.svc.cluster.local" (include "fsm.namespace" .)) .Values.fsm.tracing.address }}
{{- end -}}

{{/* FSM's log levels as the binaries' --log-level filter: fatal and panic log errors, disabled nothing. */}}
{{- define "fsm.logFilter" -}}
{{- $level := .Values.fsm.controllerLogLevel -}}
{{- if has $level (list "fatal" "panic") -}}error
{{- else if eq $level "disabled" -}}off
{{- else -}}{{ $level }}
{{- end -}}
{{- end -}}

{{/* Name of the Secret and its key that hold the Vault token. */}}
{{- define "fsm.vaultTokenSecretName" -}}
{{ default "fsm-vault-token" .Values.fsm.vault.secret.name }}
{{- end -}}
{{- define "fsm.vaultTokenSecretKey" -}}
{{ default "token" .Values.fsm.vault.secret.key }}
{{- end -}}

{{/*
Certificate provider flags, shared by fsm-controller and fsm-injector (control-plane/controller/src/identity.rs
CertArgs). The Vault token goes through the environment (FSM_VAULT_TOKEN), never the command line.
*/}}
{{- define "fsm.certificateArgs" -}}
- --certificate-provider={{ .Values.fsm.certificateProvider.kind }}
{{- if eq .Values.fsm.certificateProvider.kind "vault" }}
- --vault-host={{ .Values.fsm.vault.host }}
- --vault-port={{ int .Values.fsm.vault.port }}
- --vault-protocol={{ .Values.fsm.vault.protocol }}
- --vault-role={{ .Values.fsm.vault.role }}
{{- else if eq .Values.fsm.certificateProvider.kind "cert-manager" }}
- --cert-manager-issuer-name={{ .Values.fsm.certmanager.issuerName }}
- --cert-manager-issuer-kind={{ .Values.fsm.certmanager.issuerKind }}
- --cert-manager-issuer-group={{ .Values.fsm.certmanager.issuerGroup }}
{{- end }}
{{- end -}}

{{/* Environment of both control plane containers. */}}
{{- define "fsm.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if eq .Values.fsm.certificateProvider.kind "vault" }}
- name: FSM_VAULT_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "fsm.vaultTokenSecretName" . }}
      key: {{ include "fsm.vaultTokenSecretKey" . }}
{{- end }}
{{- end -}}

{{/* Pod security context of the control plane pods. */}}
{{- define "fsm.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container security context of the control plane containers. */}}
{{- define "fsm.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
{{- end -}}

{{/* Scheduling settings of a control plane pod; the argument is (list $ <component values>). */}}
{{- define "fsm.scheduling" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- with $root.Values.fsm.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- with $component.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $component.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.fsm.controlPlaneTolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
MeshConfig `spec.featureFlags` names (charts/fsm/crds/meshconfigs.config.flomesh.io.yaml). A value
under fsm.featureFlags that is not one of them fails the install instead of being dropped.
*/}}
{{- define "fsm.featureFlagNames" -}}
dropRouteRuleIfNoAvailableBackends enableAccessCertPolicy enableAccessControlPolicy enableAsyncProxyServiceMapping enableAutoDefaultRoute enableEgressPolicy enableIngressBackendPolicy enablePluginPolicy enableRetryPolicy enableSidecarActiveHealthChecks enableSidecarPrettyConfig enableSnapshotCacheMode enableTrafficWarmupPolicy enableValidateGRPCRouteHostnames enableValidateGatewayListenerHostname enableValidateHTTPRouteHostnames enableValidateTLSRouteHostnames useEndpointSlicesForGateway
{{- end -}}

{{/* Fails with a message naming the value when a port list holds something other than 1-65535. */}}
{{- define "fsm.validatePorts" -}}
{{- $name := index . 0 -}}
{{- range (index . 1) }}
{{- if not (regexMatch "^[0-9]+$" (toString .)) }}
{{- fail (printf "fsm.%s: %q is not a port number" $name (toString .)) }}
{{- end }}
{{- if or (lt (int .) 1) (gt (int .) 65535) }}
{{- fail (printf "fsm.%s: %v is not a port number (1-65535)" $name .) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Fails with a message naming the value when a list holds something other than an IP range a.b.c.d/x (or IPv6). */}}
{{- define "fsm.validateCIDRs" -}}
{{- $name := index . 0 -}}
{{- range (index . 1) }}
{{- if not (regexMatch "^([0-9]{1,3}(\\.[0-9]{1,3}){3}/([0-9]|[12][0-9]|3[0-2])|[0-9a-fA-F:]*:[0-9a-fA-F:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))$" (toString .)) }}
{{- fail (printf "fsm.%s: %q is not an IP range of the form a.b.c.d/x" $name (toString .)) }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Every check of the values, with a message that names the value; templates/validate.yaml runs it
once per render.
*/}}
{{- define "fsm.validate" -}}
{{- $fsm := .Values.fsm -}}
{{- $mesh := toString $fsm.meshName -}}
{{- if or (gt (len $mesh) 63) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $mesh)) }}
{{- fail (printf "fsm.meshName %q must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit" $mesh) }}
{{- end }}
{{- $ns := include "fsm.namespace" . -}}
{{- if or (gt (len $ns) 63) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $ns)) }}
{{- fail (printf "fsm.fsmNamespace %q must be a DNS label" $ns) }}
{{- end }}
{{- $kind := toString $fsm.certificateProvider.kind -}}
{{- if not (has $kind (list "tresor" "vault" "cert-manager")) }}
{{- fail (printf "fsm.certificateProvider.kind must be one of tresor, vault, cert-manager (got %q)" $kind) }}
{{- end }}
{{- if eq $kind "vault" }}
{{- if not $fsm.vault.host }}
{{- fail "fsm.vault.host is required when fsm.certificateProvider.kind is vault" }}
{{- end }}
{{- if not (has (toString $fsm.vault.protocol) (list "http" "https")) }}
{{- fail (printf "fsm.vault.protocol must be http or https (got %q)" (toString $fsm.vault.protocol)) }}
{{- end }}
{{- if not (or $fsm.vault.token (and $fsm.vault.secret.name $fsm.vault.secret.key)) }}
{{- fail "fsm.certificateProvider.kind vault needs fsm.vault.token, or both fsm.vault.secret.name and fsm.vault.secret.key" }}
{{- end }}
{{- if and $fsm.vault.token $fsm.vault.secret.name }}
{{- fail "set either fsm.vault.token or fsm.vault.secret.name/key, not both" }}
{{- end }}
{{- end }}
{{- if eq $kind "cert-manager" }}
{{- if not $fsm.certmanager.issuerName }}
{{- fail "fsm.certmanager.issuerName is required when fsm.certificateProvider.kind is cert-manager" }}
{{- end }}
{{- if not (has (toString $fsm.certmanager.issuerKind) (list "Issuer" "ClusterIssuer")) }}
{{- fail (printf "fsm.certmanager.issuerKind must be Issuer or ClusterIssuer (got %q)" (toString $fsm.certmanager.issuerKind)) }}
{{- end }}
{{- end }}
{{- if ne (toString $fsm.caBundleSecretName) "fsm-ca-bundle" }}
{{- fail (printf "fsm.caBundleSecretName %q: fsm-controller and fsm-injector keep the mesh root in the Secret fsm-ca-bundle; other names are not supported yet" (toString $fsm.caBundleSecretName)) }}
{{- end }}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$" (toString $fsm.certificateProvider.serviceCertValidityDuration)) }}
{{- fail (printf "fsm.certificateProvider.serviceCertValidityDuration %q is not a duration like 24h or 1h30m" (toString $fsm.certificateProvider.serviceCertValidityDuration)) }}
{{- end }}
{{- if or (lt (int $fsm.certificateProvider.certKeyBitSize) 2048) (gt (int $fsm.certificateProvider.certKeyBitSize) 4096) }}
{{- fail (printf "fsm.certificateProvider.certKeyBitSize must be 2048 to 4096 (got %v)" $fsm.certificateProvider.certKeyBitSize) }}
{{- end }}
{{- if not (regexMatch "^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$" (toString $fsm.configResyncInterval)) }}
{{- fail (printf "fsm.configResyncInterval %q is not a duration like 0s or 30s" (toString $fsm.configResyncInterval)) }}
{{- end }}
{{- with $fsm.tracing.sampledFraction }}
{{- if not (regexMatch "^(0(\\.[0-9]+)?|1(\\.0+)?|\\.[0-9]+)$" (toString .)) }}
{{- fail (printf "fsm.tracing.sampledFraction %q must be a decimal from 0 to 1, such as \"0.1\"" (toString .)) }}
{{- end }}
{{- end }}
{{- if not (has (toString $fsm.sidecarClass) (list "envoy" "fsm-sidecar")) }}
{{- fail (printf "fsm.sidecarClass must be envoy or fsm-sidecar (got %q)" (toString $fsm.sidecarClass)) }}
{{- end }}
{{- if not (has (toString $fsm.controllerLogLevel) (list "trace" "debug" "info" "warn" "error" "fatal" "panic" "disabled")) }}
{{- fail (printf "fsm.controllerLogLevel must be one of trace, debug, info, warn, error, fatal, panic, disabled (got %q)" (toString $fsm.controllerLogLevel)) }}
{{- end }}
{{- range $component := list "fsmController" "injector" }}
{{- $replicas := (index $fsm $component).replicaCount }}
{{- if or (not (regexMatch "^[0-9]+$" (toString $replicas))) (lt (int $replicas) 1) }}
{{- fail (printf "fsm.%s.replicaCount must be a whole number of at least 1 (got %v)" $component $replicas) }}
{{- end }}
{{- end }}
{{- range $component := list "fsmController" "injector" }}
{{- $timeout := (index $fsm $component).webhookTimeoutSeconds }}
{{- if or (not (regexMatch "^[0-9]+$" (toString $timeout))) (lt (int $timeout) 1) (gt (int $timeout) 30) }}
{{- fail (printf "fsm.%s.webhookTimeoutSeconds must be 1 to 30 (got %v)" $component $timeout) }}
{{- end }}
{{- end }}
{{- if lt (int $fsm.maxDataPlaneConnections) 0 }}
{{- fail "fsm.maxDataPlaneConnections must not be negative" }}
{{- end }}
{{- include "fsm.validatePorts" (list "outboundPortExclusionList" $fsm.outboundPortExclusionList) }}
{{- include "fsm.validatePorts" (list "inboundPortExclusionList" $fsm.inboundPortExclusionList) }}
{{- include "fsm.validateCIDRs" (list "outboundIPRangeExclusionList" $fsm.outboundIPRangeExclusionList) }}
{{- include "fsm.validateCIDRs" (list "outboundIPRangeInclusionList" $fsm.outboundIPRangeInclusionList) }}
{{- $known := splitList " " (include "fsm.featureFlagNames" .) }}
{{- range $flag, $value := $fsm.featureFlags }}
{{- if not (has $flag $known) }}
{{- fail (printf "fsm.featureFlags.%s is not a MeshConfig feature flag (known: %s)" $flag (join ", " $known)) }}
{{- end }}
{{- if not (kindIs "bool" $value) }}
{{- fail (printf "fsm.featureFlags.%s must be true or false (got %v)" $flag $value) }}
{{- end }}
{{- end }}
{{- if $fsm.grafanaDashboards.enabled }}
{{- range $key := list "label" "folderAnnotation" }}
{{- $name := toString (index $fsm.grafanaDashboards $key) }}
{{- if not (regexMatch "^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$" $name) }}
{{- fail (printf "fsm.grafanaDashboards.%s %q is not a Kubernetes label or annotation key" $key $name) }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$" (toString $fsm.grafanaDashboards.labelValue)) }}
{{- fail (printf "fsm.grafanaDashboards.labelValue %q is not a Kubernetes label value" (toString $fsm.grafanaDashboards.labelValue)) }}
{{- end }}
{{- end }}
{{- if $fsm.deployPrometheus }}
{{- fail "fsm.deployPrometheus is not supported by this chart yet: bring your own Prometheus (the fsm-controller pods carry prometheus.io scrape annotations; fsm.prometheusConfig.enabled ships the mesh's Prometheus configuration)" }}
{{- end }}
{{- end -}}
