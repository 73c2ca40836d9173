#!/usr/bin/env bash
# Rebuild and reinstall the package as an editable install (Python files are
# used live from python/; C++ changes need this script again), serialised by
# a lock so several shells can call it at once.
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9>/tmp/llmio_dev_build.lock
flock 9
python3 -m pip install --no-build-isolation --no-deps -q -e . 2>&1 | grep -v "Running pip as the 'root'" || true
python3 -c "import llmio_native as l; print('built', l.__version__, l.info()['compiled'])"
