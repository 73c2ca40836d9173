#!/usr/bin/env bash
# Regenerates the type stubs of the compiled modules (python/llmio_native/_core.pyi and
# _cuda.pyi) from a build: run after changing any binding, then commit the .pyi files.
# tests/test_package.py fails when a stub lacks a name the module has.
# Needs: pip install pybind11-stubgen; the modules built into python/llmio_native.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
for m in _core _cuda; do
  PYTHONPATH=python python3 -m pybind11_stubgen "llmio_native.$m" -o "$out" --ignore-all-errors >/dev/null
  cp "$out/llmio_native/$m.pyi" "python/llmio_native/$m.pyi"
done
rm -rf "$out"
echo "stubs written: python/llmio_native/_core.pyi python/llmio_native/_cuda.pyi"
