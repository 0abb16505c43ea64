# Sourced by tools/build_llama_tools.sh and tools/build_rpc.sh (needs VERSION): sets WORK, the cache
# folder ($GGUFQ_LLAMA_SRC or ~/.cache/ggufq/llama-src), and SRC, the llama.cpp vendored in the
# llama-cpp-python $VERSION sdist, downloaded and unpacked there the first time.
WORK="${GGUFQ_LLAMA_SRC:-$HOME/.cache/ggufq/llama-src}"
mkdir -p "$WORK"
if [ ! -d "$WORK/llama_cpp_python-$VERSION" ]; then
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK"
  tar xzf "$WORK/llama_cpp_python-$VERSION.tar.gz" -C "$WORK"
fi
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
