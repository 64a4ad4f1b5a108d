#!/bin/sh
# Container entry point for the SKF worker image.
#   (no args) or args starting with "-"  -> prefect worker start --with-healthcheck <args>
#   anything else                       -> run it as given (k8s flow-run pods, `skf ...`, a shell)
set -eu

if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- prefect worker start --with-healthcheck "$@"
fi
exec "$@"
