#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
case "$QUERY_STRING" in
put=*=*)
    kv=${QUERY_STRING#put=}
    key=${kv%%=*}
    printf '%s\n' "${kv#*=}" > "/tmp/kv/$key" && echo "OK $key" ;;
get=*)
    cat "/tmp/kv/${QUERY_STRING#get=}" 2>/dev/null || echo MISSING ;;
counter) cat /tmp/counter ;;
boot) cat /tmp/boot; echo ;;
keys) ls /tmp/kv | wc -l ;;
*) echo "BAD REQUEST" ;;
esac
