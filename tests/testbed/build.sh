#!/usr/bin/env bash
# Build every pinned test-bed binary that is not cached yet. Idempotent: a warm cache does nothing.
# Binaries land in $TESTBED_CACHE/bin/<name>-<version>; a pin change builds a new file.
# Everything comes from Go modules (the configured Go module proxy); nothing else is downloaded.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=/dev/null
source "$here/versions.env"
cache="${TESTBED_CACHE:-$HOME/.cache/dreambooth-testbed}"
mkdir -p "$cache/bin"
export GOFLAGS="${GOFLAGS:-} -trimpath"
# Modules come from the configured Go module proxy only: no fallback to fetching from VCS.
GOPROXY="$(go env GOPROXY)"; GOPROXY="${GOPROXY//,direct/}"; GOPROXY="${GOPROXY//|direct/}"
export GOPROXY
# Builds share the CPU with everything else on the machine: stay polite.
nice_go() { nice -n "${TESTBED_NICE:-10}" go "$@"; }
total_start=$SECONDS
built=0

# Debian tools real-0 needs (installed when missing; Debian 12: containerd 1.6, CNI plugins 1.1).
need_debs=()
# The node's namespaces (unshare, nsenter) and its link to the host (ip).
{ command -v unshare && command -v nsenter; } >/dev/null || need_debs+=(util-linux)
command -v ip >/dev/null || need_debs+=(iproute2)
# runc runs the pods' containers for containerd; buildah builds and exports their images (make images).
command -v runc >/dev/null || need_debs+=(runc)
command -v buildah >/dev/null || need_debs+=(buildah)
# containerd (its own root, state and socket per test bed), the CNI plugins, and what kube-proxy
# programs Services with.
command -v containerd >/dev/null || need_debs+=(containerd)
[ -x /usr/lib/cni/bridge ] || need_debs+=(containernetworking-plugins)
command -v iptables >/dev/null || need_debs+=(iptables)
command -v conntrack >/dev/null || need_debs+=(conntrack)
if [ ${#need_debs[@]} -gt 0 ]; then
  echo "installing ${need_debs[*]} (test-bed nodes)" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_debs[@]}"
fi

have() { local f; for f in "$@"; do [ -x "$f" ] || return 1; done; }

# go_install NAME MODULE VERSION [PACKAGE] [LDFLAGS]: `go install PACKAGE@VERSION` into the cache.
go_install() {
  local name="$1" module="$2" version="$3" package="${4:-$2}" ldflags="${5:-}"
  local target="$cache/bin/$name-$version"
  have "$target" && return 0
  echo "building $name $version (one time; cached in $cache)" >&2
  local start=$SECONDS tmp
  tmp="$(mktemp -d)"
  GOBIN="$tmp" nice_go install -ldflags "$ldflags" "$package@$version"
  mv "$tmp/$(basename "$package")" "$target"
  rm -rf "$tmp"
  built=1
  echo "built $name in $((SECONDS - start)) s" >&2
}

# sync_k8s_wrapper: make k8s-wrapper/go.mod require the pinned k8s.io/kubernetes and replace
# EVERY staging module (each `k8s.io/* v0.0.0` line of that release's go.mod) with v0.Y.Z.
sync_k8s_wrapper() {
  local dir="$here/k8s-wrapper" current staging gomod m
  current="$(cd "$dir" && go mod edit -json | python3 -c 'import json,sys; print(next((r["Version"] for r in json.load(sys.stdin).get("Require") or [] if r["Path"]=="k8s.io/kubernetes"), ""))')"
  [ "$current" = "$KUBERNETES_VERSION" ] && return 0
  echo "pointing k8s-wrapper at k8s.io/kubernetes $KUBERNETES_VERSION (commit its go.mod and go.sum)" >&2
  staging="v0.${KUBERNETES_VERSION#v1.}"
  gomod="$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')"
  (
    cd "$dir"
    printf 'module dreambooth.local/testbed/k8s-wrapper\n\ngo 1.26.0\n' > go.mod
    go mod edit -require="k8s.io/kubernetes@$KUBERNETES_VERSION"
    for m in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$gomod" | sort -u); do
      go mod edit -replace="$m=$m@$staging"
    done
    for m in $K8S_COMPONENTS; do
      go mod edit -tool="k8s.io/kubernetes/cmd/$m"
    done
    nice_go mod tidy
  )
}

# Every component built from k8s.io/kubernetes: the control plane, kubectl, and real-0's node.
K8S_COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy"

build_kubernetes() {
  local v="$KUBERNETES_VERSION" c missing=() minor pkgs=()
  for c in $K8S_COMPONENTS; do have "$cache/bin/$c-$v" || missing+=("$c"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  sync_k8s_wrapper
  echo "building ${missing[*]} $v (one time; long when the Go build cache is cold)" >&2
  local start=$SECONDS tmp ld=(-s -w) pkg
  minor="${v#v1.}"; minor="${minor%%.*}"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    # kwokctl runs `<binary> --version` and picks flags by it: stamp the release.
    ld+=("-X $pkg.gitVersion=$v" "-X $pkg.gitMajor=1" "-X $pkg.gitMinor=$minor" "-X $pkg.gitTreeState=clean")
  done
  for c in "${missing[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  tmp="$(mktemp -d)"
  (cd "$here/k8s-wrapper" && nice_go build -ldflags "${ld[*]}" -o "$tmp/" "${pkgs[@]}")
  for c in "${missing[@]}"; do mv "$tmp/$c" "$cache/bin/$c-$v"; done
  rm -rf "$tmp"
  built=1
  echo "built ${missing[*]} in $((SECONDS - start)) s" >&2
}

# build_wrapper NAME WRAPPER MODULE VERSION [LDFLAGS]: build the main package of tests/testbed/WRAPPER,
# whose go.mod requires MODULE; a pin change rewrites that go.mod (commit it and its go.sum).
build_wrapper() {
  local name="$1" dir="$here/$2" module="$3" version="$4" ldflags="-s -w ${5:-}" current
  local target="$cache/bin/$name-$version"
  have "$target" && return 0
  current="$(cd "$dir" && go mod edit -json | MODULE="$module" python3 -c 'import json,os,sys; print(next((r["Version"] for r in json.load(sys.stdin).get("Require") or [] if r["Path"]==os.environ["MODULE"]), ""))')"
  if [ "$current" != "$version" ]; then
    echo "pointing $2 at $module $version (commit its go.mod and go.sum)" >&2
    (cd "$dir" && go mod edit -require="$module@$version" && nice_go get "$module@$version" && nice_go mod tidy)
  fi
  echo "building $name $version (one time)" >&2
  local start=$SECONDS
  (cd "$dir" && nice_go build -ldflags "$ldflags" -o "$target.tmp" . && mv "$target.tmp" "$target")
  built=1
  echo "built $name in $((SECONDS - start)) s" >&2
}

# build_pause: the pod sandbox's process (static; the whole of real-0's pause image), keyed by its source.
build_pause() {
  local key target
  key="$(cat "$here/pause/go.mod" "$here/pause/main.go" | sha256sum | cut -c1-12)"
  target="$cache/bin/pause-$key"
  have "$target" && return 0
  local start=$SECONDS
  (cd "$here/pause" && CGO_ENABLED=0 nice_go build -ldflags "-s -w" -o "$target.tmp" . && mv "$target.tmp" "$target")
  built=1
  echo "built pause in $((SECONDS - start)) s" >&2
}

go_install minio "$MINIO_MODULE" "$MINIO_VERSION"
build_kubernetes
build_wrapper etcd etcd-wrapper go.etcd.io/etcd/server/v3 "$ETCD_VERSION"
# CoreDNS with only the plugins real-0's Corefile uses.
build_wrapper coredns coredns-wrapper github.com/coredns/coredns "$COREDNS_VERSION" "-X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
build_pause
kwok_ld="-s -w -X $KWOK_MODULE/pkg/consts.KubeVersion=${KUBERNETES_VERSION#v}"
go_install kwok "$KWOK_MODULE" "$KWOK_VERSION" "$KWOK_MODULE/cmd/kwok" "$kwok_ld"
go_install kwokctl "$KWOK_MODULE" "$KWOK_VERSION" "$KWOK_MODULE/cmd/kwokctl" "$kwok_ld"
go_install kueue "$KUEUE_MODULE" "$KUEUE_VERSION" "$KUEUE_MODULE/cmd/kueue" "-s -w -X $KUEUE_MODULE/pkg/version.GitVersion=$KUEUE_VERSION"
go_install helm "$HELM_MODULE" "$HELM_VERSION" "$HELM_MODULE/cmd/helm" "-s -w -X $HELM_MODULE/internal/version.version=$HELM_VERSION"
if [ "$built" = 1 ]; then
  echo "test-bed cold build took $((SECONDS - total_start)) s" >&2
fi
