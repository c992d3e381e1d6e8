#!/usr/bin/env bash
# One prepared check for a GPU machine (issues 13, 20). In under 9 minutes it runs, each part
# time-boxed so one failure loses nothing else, in this order:
#   env      torch / CUDA / GPU name
#   tests    the device-dependent tests: tests/test_students.py -k cuda (CUDA equality, bf16 autocast,
#            compiled BN), tests/test_decode*.py (this CPU's decode and resize; nvJPEG extraction and
#            stage two with its pixel check), stage two's CLI with default options (without pytest:
#            an inline equality check)
#   p4       student fwd+bwd vs plain dense timm: ResNet-18/50, 224 px, batch 128, bf16, 16/32 px
#   p2       training step fed by the loader (decoders pil and nvjpeg) vs batches ready on the device
#            vs a live CAE-L teacher (+ P5 queue share)
#   vit      ViT-L/16 bare forward (MAE-L, CAE-L; random init; bf16; masked and full view) and stage
#            one end to end per decoder (pil, nvjpeg)
#   me       MinkowskiEngine on CUDA: a carried wheel (ME_WHEEL) or a time-boxed foreground build from the
#            sdist and OpenBLAS .debs in ME_CARRY (default .devcarry; device_me_build.sh), then its CUDA tests
#            and P4 with the minkowski arm in fp32 and under bf16 autocast
#   decode   nvJPEG batched decode + crop/resize/flip on the GPU vs PIL in one core, pixel difference
#   reader   P2b cache reader + P2c CacheViewDataset loader (CPU side of the machine)
#   p4c      P4 for the masked backend with torch.compile'd BatchNorm (Triton)
# and writes OUT/gpu.json (every part's goals in one `goals` object, the GPU's name, each
# part's exit code and seconds) and OUT/device_check.log (all output).
#
# Usage: benchmarks/device_check.sh [OUT_DIR] [--dry-run] [--budget SECONDS] [--parts env,tests,me,...]
#   OUT_DIR: default $OUT, else benchmarks/results/device_check.
#   --dry-run: CPU, every size shrunk: checks the script end to end (a few minutes on 2 cores).
#   --parts: the parts to run (default all, in the order above; a second run on a short lease
#            re-measures only what changed)
#   --budget: wall seconds for all parts (default 530; dry run 900); a part starts only with
#             >= 20 s left and gets at most what is left (parts run in order of importance).
# Environment: PYTHON (default python3); ME_CARRY (default .devcarry: no ME build without its sdist);
# ME_WHEEL (a MinkowskiEngine wheel built on such a machine before: installed instead of building).
# Wheels the machine lacks (zarr, numcodecs, webdataset, crc32c, msgspec, donfig, google-crc32c,
# braceexpand) go on PYTHONPATH before the call. The repository
# root is made importable as package `hgkd` through a symlink in a temporary folder.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY=0
BUDGET=""
PARTS_WANTED="env,tests,p4,p2,vit,me,decode,reader,p4c"
OUT_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --parts) PARTS_WANTED="$2"; shift ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) OUT_DIR="$1" ;;
  esac
  shift
done
OUT_DIR=${OUT_DIR:-${OUT:-$REPO/benchmarks/results/device_check}}
[ -z "$BUDGET" ] && { [ "$DRY" = 1 ] && BUDGET=900 || BUDGET=530; }
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/device_check.log"
exec > >(tee -a "$LOG") 2>&1

PY=${PYTHON:-python3}
PKG=$(mktemp -d /tmp/hgkd_pkg.XXXXXX)
ln -s "$REPO" "$PKG/hgkd"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$REPO" || exit 1
START=$(date +%s)
PARTS="$OUT_DIR/parts.tsv"
: > "$PARTS"
echo "== device_check $(date -u +%FT%TZ) repo=$REPO out=$OUT_DIR dry_run=$DRY budget=${BUDGET}s python=$PY"

# run_part NAME CAP_SECONDS CMD...: time-boxed, output tee'd, exit code and seconds recorded.
wanted() { [[ ",$PARTS_WANTED," == *",$1,"* ]]; }
run_part() {
  local name=$1 cap=$2; shift 2
  wanted "${name%%_*}" || return 0
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then
    echo "== [$name] skipped: ${left}s of the budget left"
    printf '%s\t%s\t%s\n' "$name" "skipped" 0 >> "$PARTS"
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== [$name] start (time box ${cap}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$cap" "$@"
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "== [$name] TIMED OUT after ${secs}s"
  echo "== [$name] exit $rc after ${secs}s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$secs" >> "$PARTS"
}

if [ "$DRY" = 1 ]; then
  DEV=cpu
  P4_ARGS=(--students resnet18 --batches 2 --img 64 --rounds 1 --warmup 0 --granularities 16,32)
  P2_ARGS=(--quick --no-online)
  VIT_TEACHERS=mae_vit_tiny_patch16,cae_tiny_patch16 VIT_IMG=64 VIT_BATCH=8 VIT_PHOTOS=16
  READER_ARGS=(--quick)
  DECODE_ARGS=(--photos 16 --batch 8 --seconds 0.2)
  TEST_K="cpu or channels_last or decode or default_backend"
else
  DEV=cuda
  P4_ARGS=(--students resnet18,resnet50 --batches 128 --img 224 --rounds 5 --warmup 2 --granularities 16,32)
  P2_ARGS=(--p2-student resnet50 --p2-batch 128 --workers 12 --steps 4 --p2-repeats 2 --img 224 --p2-goal 0.9)
  VIT_TEACHERS=${VIT_TEACHERS:-mae_vit_large_patch16,cae_large_patch16} VIT_IMG=224 VIT_BATCH=256 VIT_PHOTOS=2048
  READER_ARGS=(--views 2048 --codecs int8ct --repeats 2 --batches 32 --photos 512 --photo-views 1024 --view-batches 16)
  DECODE_ARGS=(--photos 512 --batch 256 --seconds 3)
  # the CUDA-relevant tests (the rest runs on CPU machines), decode on this CPU, and stage two's CLI
  # with default options (extraction and distillation on CUDA)
  TEST_K="cuda or decode or default_backend"
fi
export VIT_TEACHERS VIT_IMG VIT_BATCH VIT_PHOTOS DEV

run_part env 60 "$PY" - "$OUT_DIR/env.json" <<'EOF'
import json, os, platform, subprocess, sys
import torch
info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as err:
    info["nvidia_smi"] = f"unavailable: {err}"
for mod in ("timm", "torchvision", "zarr", "numcodecs", "webdataset", "crc32c", "pytest", "MinkowskiEngine", "hgkd"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception as err:  # a missing wheel is a finding, not a crash
        info[mod] = f"missing: {type(err).__name__}: {err}"
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[1], "w"), indent=2)
if os.environ["DEV"] == "cuda" and not info["cuda_available"]:
    sys.exit("CUDA is not available: the GPU parts will fail")
EOF

if [ -z "${HGKD_NO_PYTEST:-}" ] && "$PY" -c "import pytest" 2>/dev/null; then
  run_part tests 170 "$PY" -m pytest -q -p no:cacheprovider tests/test_students.py tests/test_decode.py tests/test_distill.py tests/test_decoders.py \
    ${TEST_K:+-k "$TEST_K"} --junitxml="$OUT_DIR/tests.xml"
else
  echo "== [tests] pytest is missing: running the CUDA equality checks without it"
  run_part tests 170 "$PY" - <<'EOF'
import copy, os, torch
from hgkd.distill.students import create_encoder
dev = os.environ["DEV"]
vis = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
for name in ("resnet18", "resnet50"):
    torch.manual_seed(0)
    ref = create_encoder(name, backend="masked").double()
    for backend in ("masked", "rows"):
        twin = copy.deepcopy(ref).to(dev); twin.backend = backend
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        a = ref(x, vis); b = twin(x.to(dev), vis)
        for (fa, ma), (fb, mb) in zip(a, b):
            assert torch.equal(ma, mb.cpu()), (name, backend)
            assert (fa - fb.cpu()).abs().max() <= 1e-9 * fa.abs().max(), (name, backend)
        print(name, backend, dev, "equals masked on cpu")
EOF
fi

run_part p4 150 "$PY" benchmarks/distill.py --only p4 --device "$DEV" --arms masked,rows "${P4_ARGS[@]}" \
  --out "$OUT_DIR/p4.json"

run_part p2 150 "$PY" benchmarks/distill.py --only p2 --device "$DEV" "${P2_ARGS[@]}" --out "$OUT_DIR/p2.json"

run_part vit 120 "$PY" - "$OUT_DIR/vit.json" <<'EOF'
"""ViT-L/16 extraction throughput: bare teacher forward (bf16 on CUDA) on masked and full views,
and stage one end to end (read, decode, render, teacher, encode, Zarr writes) on ImageNet-like
JPEGs, per decoder (pil; nvjpeg on CUDA)."""
import json, os, sys, tempfile, time
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, "benchmarks")
from reader import write_photo_shards
from hgkd.extract.run import ExtractConfig, autocast_dtype, run_extract
from hgkd.extract.teachers import create_teacher
from hgkd.data.views import ViewConfig, sample_mask, view_rng

dev = torch.device(os.environ["DEV"])
img, batch, photos = int(os.environ["VIT_IMG"]), int(os.environ["VIT_BATCH"]), int(os.environ["VIT_PHOTOS"])
amp = autocast_dtype("auto", dev)
cfg = ViewConfig(img_size=img)
views = torch.randint(0, 256, (batch, 3, img, img), dtype=torch.uint8, device=dev)
mask = torch.from_numpy(np.stack([sample_mask(view_rng(0, str(i), 0), cfg).reshape(-1) for i in range(batch)])).to(dev)
out = {"device": str(dev), "img": img, "batch": batch, "precision": str(amp), "forward_views_per_s": {}}
for name in os.environ["VIT_TEACHERS"].split(","):
    torch.manual_seed(0)
    teacher = create_teacher(name, img_size=img).to(dev).eval()
    for view in ("masked", "full"):
        with torch.no_grad():
            for _ in range(2):
                teacher.targets(views, mask, full_view=view == "full", amp=amp)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 2 or n < 2:
                teacher.targets(views, mask, full_view=view == "full", amp=amp)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                n += 1
        out["forward_views_per_s"][f"{name}/{view}"] = n * batch / (time.perf_counter() - start)
        print(f"{name} {view} view: {out['forward_views_per_s'][f'{name}/{view}']:,.0f} views/s", flush=True)
    del teacher
name = os.environ["VIT_TEACHERS"].split(",")[-1]
out["run_extract"], out["goals"] = {}, {}
with tempfile.TemporaryDirectory() as tmp:
    data = write_photo_shards(Path(tmp) / "photos", photos)
    for decoder in ["pil"] + (["nvjpeg"] if dev.type == "cuda" else []):
        ecfg = ExtractConfig(data=[data], out=str(Path(tmp) / f"cache-{decoder}.zarr"), teacher=name, device=str(dev),
                             view=ViewConfig(img_size=img, views_per_image=2, decoder=decoder), batch_size=batch,
                             shard_views=256, workers=min(12, os.cpu_count() or 1), progress=False)
        report = run_extract(ecfg)
        row = out["run_extract"][decoder] = {
            "teacher": name, "views": report.views_written, "views_per_s": report.views_written / report.seconds,
            "teacher_share": report.teacher_seconds / report.seconds, "workers": ecfg.workers}
        print(f"run_extract {name} decoder {decoder}: {row['views_per_s']:,.0f} views/s, "
              f"teacher {100 * row['teacher_share']:.0f}% of wall", flush=True)
        ratio = row["views_per_s"] / out["forward_views_per_s"][f"{name}/masked"]
        out["goals"][f"extract_end_to_end_{decoder}_vs_bare_forward"] = {
            "value": ratio, "goal": 0.9, "met": ratio >= 0.9,
            "measure": f"run_extract views/s ({photos} photos x 2 views: read, decode ({decoder}), render, {name} "
                       f"masked bf16, encode, Zarr writes; {ecfg.workers} reader threads, batch {batch}) / bare "
                       f"teacher forward views/s, same batch"}
json.dump(out, open(sys.argv[1], "w"), indent=2)
EOF

# MinkowskiEngine on CUDA: a carried wheel (ME_WHEEL) or a time-boxed build from the carried sdist and
# OpenBLAS .debs (device_me_build.sh: 129 s on 16 cores), in the foreground so that no measured part
# shares the CPU with the compiler; then its CUDA tests and P4 (fp32, and bf16 autocast).
ME_CARRY=${ME_CARRY:-$REPO/.devcarry}
ME_SITE=$(mktemp -d /tmp/hgkd_me_site.XXXXXX)
if wanted me && [ "$DEV" = cuda ]; then
  if [ -n "${ME_WHEEL:-}" ] && [ -f "$ME_WHEEL" ]; then
    run_part me_install 60 "$PY" -m pip install -q --no-deps --no-index --target "$ME_SITE" "$ME_WHEEL"
    for deb in "$ME_CARRY"/*.deb; do dpkg -x "$deb" "$ME_SITE/blas"; done  # its OpenBLAS, at run time
    printf '{"ok": true, "reason": "carried wheel %s", "seconds": 0}\n' "$(basename "$ME_WHEEL")" > "$OUT_DIR/me_build.json"
  elif [ -f "$ME_CARRY/MinkowskiEngine-0.5.4.tar.gz" ]; then
    run_part me_build 240 bash "$REPO/benchmarks/device_me_build.sh" "$ME_CARRY" "$OUT_DIR" "$ME_SITE"
    [ -f "$OUT_DIR/me_build.json" ] || printf '{"ok": false, "reason": "time box: not built within its time box"}\n' \
      > "$OUT_DIR/me_build.json"
  fi
  cat "$OUT_DIR/me_build.json" 2>/dev/null
  if grep -q '"ok": true' "$OUT_DIR/me_build.json" 2>/dev/null; then
    for blas in "$ME_SITE"/blas-lib "$ME_SITE"/blas/usr/lib/x86_64-linux-gnu "$ME_SITE"/blas/usr/lib/x86_64-linux-gnu/openblas-pthread; do
      [ -d "$blas" ] && export LD_LIBRARY_PATH="$blas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    export PYTHONPATH="$ME_SITE:$PYTHONPATH"
    run_part me_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_students.py -k "minkowski and cuda" \
      --junitxml="$OUT_DIR/tests_me.xml"
    for prec in fp32 bf16; do
      run_part me_p4_$prec 60 "$PY" benchmarks/distill.py --only p4 --device "$DEV" --arms minkowski,rows \
        "${P4_ARGS[@]}" --students resnet50 --rounds 3 --precision "$prec" --out "$OUT_DIR/p4_minkowski_$prec.json"
    done
  fi
fi

run_part decode 60 "$PY" benchmarks/gpu_decode.py --device "$DEV" "${DECODE_ARGS[@]}" --out "$OUT_DIR/decode.json"

run_part reader 180 "$PY" benchmarks/reader.py "${READER_ARGS[@]}" --out "$OUT_DIR/reader.json"

run_part p4c 120 "$PY" benchmarks/distill.py --only p4 --device "$DEV" --arms masked-compiled "${P4_ARGS[@]}" \
  --students resnet50 --out "$OUT_DIR/p4_compiled.json"

echo "== combine"
"$PY" - "$OUT_DIR" "$DRY" <<'EOF'
import json, os, sys, time
from pathlib import Path
out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
env = load("env.json") or {}
parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, rc, secs = line.split("\t")
    parts[name] = {"exit": rc, "seconds": int(secs), "ok": rc == "0"}
result = {"gpu": env.get("gpu") or ("none (CPU dry run)" if dry else None), "dry_run": dry,
          "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "env": env, "parts": parts, "goals": {}}
for part, file in (("p2", "p2.json"), ("p4", "p4.json"), ("p4c", "p4_compiled.json"), ("reader", "reader.json"),
                   ("vit", "vit.json"), ("decode", "decode.json"), ("me_build", "me_build.json"),
                   ("p4me_fp32", "p4_minkowski_fp32.json"), ("p4me_bf16", "p4_minkowski_bf16.json")):
    blob = load(file)
    if blob is None:
        continue
    suffix = {"p4c": "_compiled_bn", "p4me_fp32": "_with_minkowski_fp32", "p4me_bf16": "_with_minkowski_bf16"}.get(part, "")
    for goal, row in blob.pop("goals", {}).items():
        result["goals"][goal + suffix] = {**row, "part": part}
    result[part] = blob
vit, decode = result.get("vit"), result.get("decode")
if vit and decode:  # can GPU decode feed the teacher? (stage one is decode-bound with PIL)
    forward = max(v for k, v in vit["forward_views_per_s"].items() if k.endswith("/masked"))
    rate = decode["views_per_s"]["nvjpeg_decode_render"]
    result["goals"]["nvjpeg_views_vs_vit_forward"] = {
        "value": rate / forward, "goal": 1.0, "met": rate >= forward, "part": "decode",
        "measure": "nvJPEG decode + crop/resize/flip views/s / the fastest ViT-L masked bf16 forward views/s"}
if "me_build" in result:
    result["goals"]["minkowski_cuda_build"] = {
        "value": float(result["me_build"]["ok"]), "goal": 1.0, "met": bool(result["me_build"]["ok"]), "part": "me_build",
        "measure": f"MinkowskiEngine 0.5.4 CUDA build from the sdist: {result['me_build']['reason']}"}
import xml.etree.ElementTree as ET
for key, xml in (("tests", "tests.xml"), ("tests_me", "tests_me.xml")):
    if (out / xml).exists():
        suite = ET.parse(out / xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        result[key] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
(out / "gpu.json").write_text(json.dumps(result, indent=2))
print(f"{'part':<10}{'exit':>8}{'seconds':>9}")
for name, row in parts.items():
    print(f"{name:<10}{row['exit']:>8}{row['seconds']:>9}")
print(f"\n{'goal':<52}{'value':>13}{'goal':>10}  met")
for name, row in result["goals"].items():
    print(f"{name:<52}{row['value']:>13,.3f}{row['goal']:>10,.3f}  {'yes' if row['met'] else 'NO'}")
print(f"wrote {out / 'gpu.json'} (gpu: {result['gpu']}; tests: {result.get('tests')})")
EOF
echo "== done in $(( $(date +%s) - START ))s"
rm -rf "$PKG" "$ME_SITE"
# The JSON is written either way; the exit status says whether every part passed.
failed=$(awk -F'\t' '$2 != "0" {print $1}' "$PARTS" | tr '\n' ' ')
if [ -n "$failed" ]; then echo "== failed parts: $failed(see $OUT_DIR/device_check.log)"; exit 1; fi
