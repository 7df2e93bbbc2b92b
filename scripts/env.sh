# shellcheck shell=bash
# Sourced by scripts/build.sh, ./test.sh and ./run.sh. Finds or provisions libtorch 2.11.0 and
# exports what the tch build needs. Safe to source repeatedly; prints nothing when all is cached.
#
#   LIBTORCH=/path/to/libtorch   use that libtorch (must be version 2.11.0)
#   KORMLM_CACHE=DIR             cache root (default ~/.cache/kormlm)
#   KORMLM_VENV=DIR              virtualenv for torch and the test oracle (default $KORMLM_CACHE/torch-2.11.0)

KORMLM_TORCH_VERSION=2.11.0
KORMLM_CACHE=${KORMLM_CACHE:-$HOME/.cache/kormlm}
KORMLM_VENV=${KORMLM_VENV:-$KORMLM_CACHE/torch-$KORMLM_TORCH_VERSION}
KORMLM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export KORMLM_TORCH_VERSION KORMLM_CACHE KORMLM_VENV KORMLM_ROOT

kormlm_die() {
    echo "kormlm: error: $*" >&2
    return 1
}

# Prints the torch version a Python interpreter has, or nothing.
kormlm_torch_version_of() {
    "$1" -c 'import torch, sys; sys.stdout.write(torch.__version__.split("+")[0])' 2>/dev/null || true
}

# Creates the cached virtualenv with torch==2.11.0 unless it is already complete.
kormlm_provision_venv() {
    local py="$KORMLM_VENV/bin/python"
    if [ -x "$py" ] && [ "$(kormlm_torch_version_of "$py")" = "$KORMLM_TORCH_VERSION" ]; then
        return 0
    fi
    echo "kormlm: provisioning torch==$KORMLM_TORCH_VERSION into $KORMLM_VENV (one time, ~3 GB download)" >&2
    if [ ! -x "$py" ]; then
        command -v python3 >/dev/null 2>&1 || { kormlm_die "python3 is not installed; install Python 3.9+ with venv and pip, or set LIBTORCH to a libtorch $KORMLM_TORCH_VERSION directory"; return 1; }
        mkdir -p "$(dirname "$KORMLM_VENV")"
        python3 -m venv "$KORMLM_VENV" || { kormlm_die "could not create a virtualenv at $KORMLM_VENV (is python3-venv installed?)"; return 1; }
    fi
    if ! "$py" -m pip install --disable-pip-version-check --progress-bar off "torch==$KORMLM_TORCH_VERSION" >&2; then
        kormlm_die "pip could not install torch==$KORMLM_TORCH_VERSION into $KORMLM_VENV. Check network access to PyPI, or set LIBTORCH to an existing libtorch $KORMLM_TORCH_VERSION, or activate a Python that has torch==$KORMLM_TORCH_VERSION."
        return 1
    fi
}

# kormlm_link_cuda_libs TORCH_LIB_DIR [DEST]: links the NCCL and CUDA runtime that
# libtorch_cuda.so loads into DEST (default target/release/kormlm-libs, the worker's first
# runpath) as libnccl.so and libcudart.so, the names cudarc opens, so that cudarc binds the very
# files libtorch uses. Nothing to do for a CPU-only libtorch; a CUDA libtorch whose libraries
# cannot be resolved is an error.
kormlm_link_cuda_libs() {
    local torch_lib=$1 dest=${2:-${CARGO_TARGET_DIR:-$KORMLM_ROOT/target}/release/kormlm-libs}
    [ -f "$torch_lib/libtorch_cuda.so" ] || return 0
    mkdir -p "$dest" || { kormlm_die "cannot create $dest"; return 1; }
    local deps; deps=$(ldd "$torch_lib/libtorch_cuda.so" 2>&1) || { kormlm_die "ldd $torch_lib/libtorch_cuda.so failed: $deps"; return 1; }
    local stem path
    for stem in libnccl libcudart; do
        path=$(printf '%s\n' "$deps" | awk -v s="$stem" '$3 ~ /^\// && (index($1, s ".") == 1 || index($1, s "-") == 1) {print $3; exit}')
        if [ -z "$path" ]; then
            kormlm_die "$torch_lib/libtorch_cuda.so resolves no $stem (ldd: $(printf '%s\n' "$deps" | grep "$stem" || echo 'not listed')); CUDA jobs will fail until $dest/$stem.so links to it"
            return 1
        fi
        ln -sfn "$(readlink -f "$path")" "$dest/$stem.so" || { kormlm_die "cannot link $dest/$stem.so"; return 1; }
    done
}

# Decides where libtorch comes from and exports the build variables.
kormlm_setup_libtorch() {
    if [ -n "${LIBTORCH:-}" ]; then
        [ -f "$LIBTORCH/lib/libtorch_cpu.so" ] || { kormlm_die "LIBTORCH=$LIBTORCH has no lib/libtorch_cpu.so; point it at a libtorch $KORMLM_TORCH_VERSION directory"; return 1; }
        local found=""
        if [ -f "$LIBTORCH/build-version" ]; then found=$(cut -d+ -f1 < "$LIBTORCH/build-version"); fi
        if [ -z "$found" ] && [ -f "$LIBTORCH/version.py" ]; then
            found=$(sed -n "s/^__version__ = '\([0-9.]*\).*/\1/p" "$LIBTORCH/version.py")
        fi
        if [ -n "$found" ] && [ "$found" != "$KORMLM_TORCH_VERSION" ]; then
            kormlm_die "LIBTORCH=$LIBTORCH is version $found; kormlm is built against tch 0.24.0, which needs libtorch $KORMLM_TORCH_VERSION"
            return 1
        fi
        unset LIBTORCH_USE_PYTORCH
        kormlm_link_cuda_libs "$LIBTORCH/lib" || return 1
        return 0
    fi
    local sys_py; sys_py=$(command -v python3 || true)
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -n "$sys_py" ]; then
        local v; v=$(kormlm_torch_version_of "$sys_py")
        if [ "$v" = "$KORMLM_TORCH_VERSION" ]; then
            export LIBTORCH_USE_PYTORCH=1
            kormlm_link_cuda_libs "$("$sys_py" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib" || return 1
            return 0
        elif [ -n "$v" ]; then
            echo "kormlm: $sys_py has torch $v, not $KORMLM_TORCH_VERSION; using the cached virtualenv instead" >&2
        fi
    fi
    kormlm_provision_venv || return 1
    export VIRTUAL_ENV="$KORMLM_VENV"
    export PATH="$KORMLM_VENV/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
    kormlm_link_cuda_libs "$("$KORMLM_VENV/bin/python" -c 'import torch, os; print(os.path.dirname(torch.__file__))')/lib" || return 1
}

# Installs the Python test oracle (scripts/requirements-oracle.txt) into the cached virtualenv,
# next to torch==2.11.0, and exports KORMLM_PYTHON. Skipped when the requirements are unchanged.
kormlm_provision_oracle() {
    kormlm_provision_venv || return 1
    local req="$KORMLM_ROOT/scripts/requirements-oracle.txt"
    local stamp="$KORMLM_VENV/.kormlm-oracle.sha256"
    local want; want=$(sha256sum "$req" | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "kormlm: installing the Python test oracle into $KORMLM_VENV" >&2
        if ! DS_BUILD_OPS=0 "$KORMLM_VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -r "$req" >&2; then
            kormlm_die "pip could not install $req into $KORMLM_VENV; check network access to PyPI"
            return 1
        fi
        echo "$want" > "$stamp"
    fi
    export KORMLM_PYTHON="$KORMLM_VENV/bin/python"
}
