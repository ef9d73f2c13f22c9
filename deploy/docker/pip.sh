#!/bin/sh
# pip for image builds. When the build is given the BuildKit secret `ca` (a PEM file with
# one or more extra CA certificates, e.g. a TLS-inspecting proxy's), pip trusts it on top
# of its own bundle; without the secret pip runs as usual. The secret is mounted only for
# the RUN step that calls this script and never lands in a layer.
set -eu

secret=/run/secrets/ca
if [ -s "$secret" ]; then
    bundle="$(mktemp)"
    trap 'rm -f "$bundle"' EXIT
    cat "$(python -c 'import pip._vendor.certifi as c; print(c.where())')" "$secret" >"$bundle"
    export PIP_CERT="$bundle"
fi

python -m pip "$@"
