# Helpers for L1 scripts that operate the platform's VMs through their
# serial consoles (prepended to the VM-mode scenarios). Needs $P2PVMM and
# $P2PVMM_HOME, and wait_for from the harness's lib.sh.

# type_on VM TEXT: types TEXT (and a newline) on VM's serial console.
type_on() { printf '%s\n' "$2" | "$P2PVMM" console "$1" --linger-ms 300 > /dev/null 2>&1; }
# ask VM KEY COMMAND [SECONDS]: runs COMMAND in VM's console shell and
# prints its output (one line), which the shell echoes as a line
# `KEY=...#END` (KEY must be unique in the scenario; the empty line first
# ends whatever a progress bar left on the terminal).
ask() {
    _log="$P2PVMM_HOME/vms/$1/console.log"
    # The typed line never holds "KEY=" itself ("KEY"'=' is echoed), so the
    # answer is found wherever it lands on a line: the console is shared with
    # the kernel's and the services' messages. The end marker: the console
    # log grows as the serial port drains, so "KEY=" may be there before the
    # rest of its line. The answer is also kept in a file in the VM: a
    # kernel or service message written between "KEY=" and "#END" splits
    # the line, and then the answer is asked for again from the file.
    # A VM that booted again while the command ran (a guest reset) lost its
    # shell and the command with it; the other VM booting again spoils the
    # answer of a command that used it (the client asking the service's
    # node). When the scenario says how to wait for such a VM (`came_back VM
    # KEY`), the command is asked once more after the reboot: a reset is the
    # emulator's (docs/vm-mode.md), the check is what the platform does
    # after it. `reask=no` turns this off for a command that must not run
    # twice.
    _asked=0
    while :; do
        _from=$(($(wc -l < "$_log" 2>/dev/null || echo 0) + 1))
        for _v in service client; do eval "_boots_$_v=$(boots_of $_v)"; done
        type_on "$1" "_a=\$($3); echo \"\$_a\" > /tmp/ask.$2; echo; echo \"$2\"'='\"\$_a\"'#END'"
        answer_or_reboot "$_log" "$2" "${4:-90}" "$_from"
        _rc=$?
        _rebooted=
        [ $_rc -eq 2 ] && _rebooted=$1
        for _v in service client; do
            eval "_was=\$_boots_$_v"
            [ -z "$_rebooted" ] && [ "$(boots_of $_v)" -gt "$_was" ] && _rebooted=$_v
        done
        if [ -n "$_rebooted" ] && [ $_asked -eq 0 ] && [ "${reask:-yes}" = yes ] &&
            command -v came_back > /dev/null 2>&1; then
            _asked=1
            came_back "$_rebooted" "$2" >&2
            continue
        fi
        break
    done
    case $_rc in
    2)
        # Its shell, and the command, are gone: asking again cannot help.
        echo "no answer $2: the $1 VM booted again while it ran (a guest reset); its console:" >&2
        tail -30 "$_log" >&2
        return 1 ;;
    1)
        _again=0
        while [ $_again -lt 2 ]; do
            _again=$((_again + 1))
            echo "no answer $2 from the $1 VM in ${4:-90} s; asking again from /tmp/ask.$2 ($_again)" >&2
            type_on "$1" "echo; echo \"$2\"'='\"\$(cat /tmp/ask.$2)\"'#END'"
            _j=0
            while [ $_j -lt 200 ]; do
                tail -n +"$_from" "$_log" | grep -aq "$2=.*#END" && break 2
                sleep 0.1; _j=$((_j + 1))
            done
        done
        if ! tail -n +"$_from" "$_log" | grep -aq "$2=.*#END"; then
            echo "no answer $2 from the $1 VM; its console:" >&2
            tail -30 "$_log" >&2
            return 1
        fi ;;
    esac
    tail -n +"$_from" "$_log" | sed -n "s/.*$2=\(.*\)#END.*/\1/p" | tr -d '\r' | tail -1
}
# boots_of VM: how many times VM's init has announced a boot on its console.
boots_of() {
    _n=$(grep -ac "p2pvm-init: [A-Za-z]* VM, " "$P2PVMM_HOME/vms/$1/console.log" 2>/dev/null)
    echo "${_n:-0}"
}
# answer_or_reboot LOG KEY SECONDS FROM: 0 when "KEY=...#END" is in LOG, 2
# when the VM's init announced a new boot at or after line FROM, 1 after
# SECONDS of neither.
answer_or_reboot() {
    _i=0
    while [ $_i -lt $(($3 * 10)) ]; do
        tail -n +"$4" "$1" 2>/dev/null | grep -aq "$2=.*#END" && return 0
        tail -n +"$4" "$1" 2>/dev/null | grep -aq "p2pvm-init: [A-Za-z]* VM, " && return 2
        sleep 0.1; _i=$((_i + 1))
    done
    return 1
}
# follow VM: copies VM's console here, prefixed (progress, and what to read
# when something fails).
follow() {
    tail -F "$P2PVMM_HOME/vms/$1/console.log" 2>/dev/null | while IFS= read -r l; do echo "[$1] $l"; done &
}
# link_images DIR: the platform's images (as the harness put them in this
# host) in one directory, for `p2pvmm up --images DIR`.
link_images() {
    mkdir -p "$1"
    ln -sf "$GUEST_KERNEL" "$1/vmlinux"
    ln -sf "$ROOT/guest/service.cpio" "$1/service.cpio"
    ln -sf "$ROOT/guest/client.cpio" "$1/client.cpio"
}
