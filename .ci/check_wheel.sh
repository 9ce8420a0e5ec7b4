#!/usr/bin/env bash
# A non-editable install, as a user gets from `pip install genieblue-hf`: build and install the package into a fresh
# environment, then, from a folder outside the repository, import every subpackage, run the CLI's help, the README's
# quick start and the demo model's check. Fails on the first error.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="$repo/.venv-wheel"
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet "$repo"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export HF_HUB_OFFLINE=1
"$venv/bin/python" - <<'PY'
import importlib, importlib.util, pkgutil, genieblue_hf
assert "site-packages" in genieblue_hf.__file__, genieblue_hf.__file__
# modules that run inside an optional engine: vLLM loads genieblue_hf.vllm.model itself (make test-vllm covers it)
needs = {"genieblue_hf.vllm.model": "vllm"}
names = [m.name for m in pkgutil.walk_packages(genieblue_hf.__path__, "genieblue_hf.")
         if m.name not in needs or importlib.util.find_spec(needs[m.name]) is not None]
assert "genieblue_hf.vllm" in names and "genieblue_hf.vllm.route_adapter" in names, names
assert "genieblue_hf.executorch.export" in names and "genieblue_hf.executorch.runner" in names, names
import genieblue_paper  # the paper in miniature: research code beside the runtime package, in the same wheel
assert "site-packages" in genieblue_paper.__file__, genieblue_paper.__file__
names += [m.name for m in pkgutil.walk_packages(genieblue_paper.__path__, "genieblue_paper.")]
for name in names:
    importlib.import_module(name)
print("imported", len(names), "modules from", genieblue_hf.__file__, "and", genieblue_paper.__file__)
PY
"$venv/bin/genieblue" --help > /dev/null
for command in compose convert export-dense export-executorch publish "bench paper"; do
  "$venv/bin/genieblue" $command --help > /dev/null
done
# without the executorch extra, the export says what to install, in one line
if "$venv/bin/python" -c "import executorch" 2> /dev/null; then echo "executorch should not be in a plain install"; exit 1; fi
message="$("$venv/bin/genieblue" export-executorch "$work/none" "$work/out" 2>&1 || true)"
echo "$message" | grep -q "pip install 'genieblue-hf\[executorch\]'" || { echo "unexpected: $message"; exit 1; }
[ "$(echo "$message" | wc -l)" -eq 1 ] || { echo "not one line: $message"; exit 1; }
"$venv/bin/python" "$repo/examples/quickstart.py"
echo "wheel install OK"
