{{- define "balancing.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "balancing.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "balancing.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "balancing.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "balancing.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "balancing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "balancing.selectorLabels" -}}
app.kubernetes.io/name: {{ include "balancing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "balancing.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "balancing.agentServiceAccount" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "balancing.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "balancing.controllerServiceAccount" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "balancing.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The port of a HOST:PORT flag value. */}}
{{- define "balancing.portOf" -}}
{{- $parts := splitList ":" . }}{{ last $parts }}
{{- end }}

{{/* The controller's Service: the webhooks' clientConfig and the serving certificate's subject. */}}
{{- define "balancing.controllerService" -}}
{{ include "balancing.fullname" . }}-controller
{{- end }}

{{/* The DNS names the API server may use for the controller's Service (a JSON list). */}}
{{- define "balancing.webhookDNSNames" -}}
{{- $svc := include "balancing.controllerService" . }}
{{- $ns := .Release.Namespace }}
{{- $domain := .Values.webhooks.certificate.clusterDomain | trimAll "." }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns $domain) | toJson }}
{{- end }}

{{/* The kubernetes.io/tls Secret the controller serves with. */}}
{{- define "balancing.tlsSecretName" -}}
{{- if eq .Values.webhooks.certificate.mode "provided" }}
{{- .Values.webhooks.certificate.provided.secretName }}
{{- else }}
{{- include "balancing.controllerService" . }}-tls
{{- end }}
{{- end }}

{{/* cert-manager objects (certManager mode). */}}
{{- define "balancing.certManagerCertificate" -}}
{{ include "balancing.controllerService" . }}-tls
{{- end }}
{{- define "balancing.certManagerCA" -}}
{{ include "balancing.controllerService" . }}-ca
{{- end }}

{{/*
Value checks, with the knob to fix in the message: from webhook-certificate.yaml (always rendered) and
before the certificate is computed (whichever template asks first).
*/}}
{{- define "balancing.validateValues" -}}
{{- $w := .Values.webhooks }}
{{- $c := $w.certificate }}
{{- if dig "caBundle" "" $w }}
{{- fail "webhooks.caBundle is replaced by webhooks.certificate: leave it unset (mode helm, the default, provisions the CA), or set webhooks.certificate.mode=provided with webhooks.certificate.provided.caBundle and .secretName" }}
{{- end }}
{{- if dig "tlsSecretName" "" .Values.controller }}
{{- fail "controller.tlsSecretName is replaced by webhooks.certificate: leave it unset (mode helm, the default, creates the Secret), or set webhooks.certificate.mode=provided with webhooks.certificate.provided.secretName" }}
{{- end }}
{{- if and $w.enabled (not .Values.controller.enabled) }}
{{- fail "webhooks.enabled needs controller.enabled (the webhooks' server): set controller.enabled=true, or webhooks.enabled=false" }}
{{- end }}
{{- if not (has $c.mode (list "helm" "certManager" "provided")) }}
{{- fail (printf "webhooks.certificate.mode must be helm, certManager or provided, not %q" (toString $c.mode)) }}
{{- end }}
{{- if not (has (toString $w.failurePolicy) (list "Fail" "Ignore")) }}
{{- fail (printf "webhooks.failurePolicy must be Fail or Ignore, not %q" (toString $w.failurePolicy)) }}
{{- end }}
{{- $timeout := int $w.timeoutSeconds }}
{{- if or (lt $timeout 1) (gt $timeout 30) }}
{{- fail (printf "webhooks.timeoutSeconds must be 1 to 30 (the API server's limit), not %v" $w.timeoutSeconds) }}
{{- end }}
{{- if not ($c.clusterDomain | toString | trimAll ".") }}
{{- fail "webhooks.certificate.clusterDomain must not be empty (cluster.local on most clusters)" }}
{{- end }}
{{- if .Values.controller.enabled }}
{{- if eq $c.mode "helm" }}
{{- $days := int $c.helm.validityDays }}
{{- if lt $days 1 }}
{{- fail (printf "webhooks.certificate.helm.validityDays must be at least 1, not %v" $c.helm.validityDays) }}
{{- end }}
{{- $renew := int $c.helm.renewBeforeDays }}
{{- if or (lt $renew 0) (ge $renew $days) }}
{{- fail (printf "webhooks.certificate.helm.renewBeforeDays (%v) must be 0 or more and less than validityDays (%v), or every upgrade would issue a new certificate" $c.helm.renewBeforeDays $c.helm.validityDays) }}
{{- end }}
{{- else if eq $c.mode "certManager" }}
{{- with $c.certManager.issuerRef }}
{{- if not .name }}
{{- fail "webhooks.certificate.certManager.issuerRef needs a name (and kind: Issuer or ClusterIssuer), or {} for the chart's own CA" }}
{{- end }}
{{- end }}
{{- else if eq $c.mode "provided" }}
{{- if not $c.provided.secretName }}
{{- fail "webhooks.certificate.mode=provided needs webhooks.certificate.provided.secretName: an existing kubernetes.io/tls Secret (tls.crt, tls.key) in the release namespace" }}
{{- end }}
{{- if and $w.enabled (not $c.provided.caBundle) }}
{{- fail "webhooks.certificate.mode=provided needs webhooks.certificate.provided.caBundle: the PEM CA certificate that signed the Secret's certificate (base64-encoded or not)" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The controller's serving certificate, computed ONCE per render and shared by every template that includes
this (the Secret, both webhooks and the controller's checksum must agree; genCA is random), as JSON:
  caBundle  base64 PEM for the webhooks' caBundle ("" in certManager mode: cainjector fills it)
  checksum  of what the chart knows of the certificate, on the controller's pod template
  crt, key, ca, notAfter, dnsNames   helm mode: the Secret's data (base64) and annotations
Helm mode reuses the existing Secret when it fits (see values.yaml, webhooks.certificate.mode). lookup
answers {} in `helm template`, lint and client-side dry runs: a new pair is generated then.
*/}}
{{- define "balancing.webhookTLS" -}}
{{- if not (hasKey .Values "__balancingWebhookTLS") }}
{{- include "balancing.validateValues" . }}
{{- $c := .Values.webhooks.certificate }}
{{- $names := include "balancing.webhookDNSNames" . | fromJsonArray }}
{{- $tls := dict }}
{{- if eq $c.mode "helm" }}
{{- $days := int $c.helm.validityDays }}
{{- $joined := join "," $names }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "balancing.tlsSecretName" .) }}
{{- $data := dig "data" dict $existing }}
{{- $annotations := dig "metadata" "annotations" dict $existing }}
{{- $notAfter := get $annotations "balancing.elf.io/not-after" | toString }}
{{- $renewAt := now | dateModify (printf "+%dh" (mul (int $c.helm.renewBeforeDays) 24)) | unixEpoch }}
{{- $fits := and (get $data "tls.crt") (get $data "tls.key") (get $data "ca.crt") }}
{{- $fits = and $fits (eq (get $annotations "balancing.elf.io/dns-names" | toString) $joined) }}
{{- $fits = and $fits (regexMatch "^[0-9]+$" $notAfter) }}
{{- if and $fits (gt (atoi $notAfter) (atoi $renewAt)) }}
{{- $tls = dict "crt" (get $data "tls.crt") "key" (get $data "tls.key") "ca" (get $data "ca.crt") "caBundle" (get $data "ca.crt") "notAfter" $notAfter }}
{{- else }}
{{- $ca := genCA (printf "%s-ca" (include "balancing.controllerService" .)) $days }}
{{- $cert := genSignedCert (index $names 2) nil $names $days $ca }}
{{- $bundle := $ca.Cert }}
{{- with get $data "ca.crt" }}
{{- /* rotating: trust the previous CA too while the controller pods roll */}}
{{- $bundle = printf "%s\n%s\n" (trim $ca.Cert) (trim (b64dec .)) }}
{{- end }}
{{- $expires := now | dateModify (printf "+%dh" (mul $days 24)) | unixEpoch }}
{{- $tls = dict "crt" (b64enc $cert.Cert) "key" (b64enc $cert.Key) "ca" (b64enc $ca.Cert) "caBundle" (b64enc $bundle) "notAfter" $expires }}
{{- end }}
{{- $_ := set $tls "dnsNames" $joined }}
{{- $_ = set $tls "checksum" (sha256sum $tls.crt) }}
{{- else if eq $c.mode "provided" }}
{{- $raw := $c.provided.caBundle | toString | trim }}
{{- $pem := $raw }}
{{- if not (contains "-----BEGIN CERTIFICATE-----" $raw) }}
{{- $pem = b64dec $raw }}
{{- end }}
{{- if and .Values.webhooks.enabled (not (contains "-----BEGIN CERTIFICATE-----" $pem)) }}
{{- fail "webhooks.certificate.provided.caBundle is not a PEM certificate (-----BEGIN CERTIFICATE-----), base64-encoded or not" }}
{{- end }}
{{- $bundle := ternary (printf "%s\n" (trim $pem) | b64enc) "" (ne $raw "") }}
{{- $tls = dict "caBundle" $bundle "checksum" (sha256sum (printf "%s\n%s" $c.provided.secretName $bundle)) }}
{{- else }}
{{- $tls = dict "caBundle" "" "checksum" (sha256sum (toJson (dict "names" $names "certManager" $c.certManager))) }}
{{- end }}
{{- $_ := set .Values "__balancingWebhookTLS" $tls }}
{{- end }}
{{- get .Values "__balancingWebhookTLS" | toJson }}
{{- end }}

{{/*
KUBERNETES_SERVICE_HOST/PORT overrides (values k8sServiceHost/k8sServicePort): both or neither.
*/}}
{{- define "balancing.apiServerEnv" -}}
{{- if or .Values.k8sServiceHost .Values.k8sServicePort }}
{{- if not (and .Values.k8sServiceHost .Values.k8sServicePort) }}
{{- fail "k8sServiceHost and k8sServicePort go together: set both or neither" }}
{{- end }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .Values.k8sServiceHost | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .Values.k8sServicePort | toString | quote }}
{{- end }}
{{- end }}

{{/*
The agent's configuration file (config.yaml of the agent ConfigMap), a BalancingConfiguration: the keys of
agent.config as they are, plus what the chart decides from other values. The node name is null here: every
agent reads its own from BALANCING_NODE_NAME (the pod's spec.nodeName).
*/}}
{{- define "balancing.agentConfig" -}}
{{- $a := .Values.agent }}
{{- $cfg := deepCopy $a.config }}
{{- /* Helm drops a key set to null: put the nullable ones back, so the file always has every key. */}}
{{- range $key := list "hostNetns" "bpfObject" }}
{{- if not (hasKey $cfg $key) }}
{{- $_ := set $cfg $key nil }}
{{- end }}
{{- end }}
{{- if not (hasKey $cfg.events "log") }}
{{- $_ := set $cfg.events "log" nil }}
{{- end }}
{{- $source := dict "kubernetes" (dict "inCluster" true) }}
{{- if eq $a.source "manifests" }}
{{- $source = dict "manifests" $a.manifests.mountPath }}
{{- end }}
{{- $netnsDirs := list }}
{{- with $a.hostPaths.netns }}
{{- $netnsDirs = list . }}
{{- end }}
{{- $_ := set $cfg "source" $source }}
{{- $_ = set $cfg "cgroup" $a.hostPaths.cgroupMountPath }}
{{- $_ = set $cfg "bpffs" (printf "%s/balancing" (trimSuffix "/" $a.hostPaths.bpffsRoot)) }}
{{- $_ = set $cfg "netnsDirs" $netnsDirs }}
apiVersion: balancing.elf.io/v1alpha1
kind: BalancingConfiguration
nodeName: null
{{ toYaml $cfg }}
{{- end }}

{{/* Where the agent container finds its configuration file (a subPath mount of the agent ConfigMap). */}}
{{- define "balancing.agentConfigPath" -}}
/etc/balancing/config.yaml
{{- end }}
