# Shared by scripts/serve and scripts/test: Debian packages and the .venv.
# apt_install PKG...: install missing Debian packages (apt-get update first), as root or via sudo.
apt_install() {
    [ $# -gt 0 ] || return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing Debian packages: $*" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

# ensure_venv EXTRAS STAMP: create .venv when missing and (re)install the project with
# EXTRAS (e.g. "" or "[test]") when pyproject.toml is newer than STAMP.
ensure_venv() {
    local extras="$1" stamp=".venv/$2"
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        python3 -m venv .venv
        .venv/bin/python -m pip install --quiet --upgrade pip
        .venv/bin/python -m pip install --quiet -e ".$extras"
        touch "$stamp"
    fi
}
