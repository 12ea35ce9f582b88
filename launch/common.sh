# Helpers the launch scripts share (sourced, not run).

# Print a command shell-quoted (copy-pasteable), then run it unless DRY_RUN=1.
run() {
  printf '%q ' "$@"; printf '\n'
  if [ "${DRY_RUN:-0}" = 0 ]; then "$@"; fi
}

# The value of --workdir among the train arguments ("" when there is none).
workdir_of() {
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[$i]}" in
      --workdir=*) printf '%s' "${args[$i]#--workdir=}"; return;;
      --workdir) printf '%s' "${args[$((i + 1))]:-}"; return;;
    esac
  done
}
