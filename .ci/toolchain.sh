# Sourced by .ci/setup and .ci/run: makes `cargo` (and rustup's components) run when HOME
# holds no toolchain of its own (an empty HOME): use the installation cargo's path points at.
if ! cargo --version >/dev/null 2>&1; then
  cargo_bin=$(dirname "$(command -v cargo || echo /root/.cargo/bin/cargo)")
  for home in "$(dirname "$cargo_bin")" /root/.cargo /usr/local/cargo; do
    for rustup in "$(dirname "$home")/.rustup" /root/.rustup /usr/local/rustup; do
      if [ -x "$home/bin/cargo" ] && [ -d "$rustup/toolchains" ]; then
        export CARGO_HOME="$home" RUSTUP_HOME="$rustup" PATH="$home/bin:$PATH"
        break 2
      fi
    done
  done
  cargo --version >/dev/null 2>&1 || { echo "setup: cargo does not run; install the Rust toolchain (rustup) first" >&2; exit 1; }
fi

