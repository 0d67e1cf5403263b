#!/usr/bin/env bash
# Install the pinned Label Studio server into its own venv (never the project's) and pre-migrate a template
# data dir, so each test fixture starts from a copy in seconds instead of running ~240 migrations.
# Idempotent: a second run finds both in place and returns at once. Prints the wall time it took.
#
#   DEFECT_LOOP_LABELSTUDIO_VENV      server venv (default ~/.cache/defect-loop/labelstudio-venv)
#   DEFECT_LOOP_LABELSTUDIO_TEMPLATE  template tar (default next to the venv); "none" skips it
#   PYTHON                            base interpreter for the venv (default python3.11, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-$(command -v python3.11 || command -v python3)}"
started=$("$python_bin" -c "import time; print(time.time())")
venv="${DEFECT_LOOP_LABELSTUDIO_VENV:-$HOME/.cache/defect-loop/labelstudio-venv}"
template="${DEFECT_LOOP_LABELSTUDIO_TEMPLATE:-$(dirname "$venv")/labelstudio-1.23.2-migrated-data.tar.gz}"
args=(install --venv "$venv")
if [ "$template" != "none" ]; then
  args+=(--template "$template")
fi
# Run as a file, not `-m labeling...`: the module needs only the standard library, the package needs the project's deps.
"$python_bin" labeling/labelstudio_server.py "${args[@]}"
"$python_bin" -c "import time; print(f'Label Studio install step: {time.time() - $started:.1f} s wall')"
