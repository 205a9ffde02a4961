"""engine/daemon/cmdline.py: qemu-storage-daemon 7.2's command line.

The expected messages in CMDLINE_CASES were produced by qemu-storage-daemon 7.2 itself (the
text after "qemu-storage-daemon: ", or after argv[0] for getopt's messages, marked
"getopt:"); semantic failures qsd reports when it executes an option (missing nodes, NBD
server not running, ...) appear as None because parsing succeeds. No QEMU is needed to run.
"""

# ruff: noqa: E501  (tables of verbatim QEMU texts)
from __future__ import annotations

import pytest

from engine.daemon.cmdline import (
    EXIT_FAILURE,
    CmdlineError,
    DaemonConfig,
    nbd_server_start_args,
    parse_cmdline,
)

# (argv, expected): None = parses, "help"/"version", "getopt:<msg>" or the error message
CMDLINE_CASES = [
    (['--bogus'], "getopt:unrecognized option '--bogus'"),
    (['-x'], "getopt:invalid option -- 'x'"),
    (['--blockdev'], "getopt:option '--blockdev' requires an argument"),
    (['--pidfile'], "getopt:option '--pidfile' requires an argument"),
    (['extra'], 'extra: Unexpected argument'),
    (['--blockdev', 'null-co,node-name=a'], None),
    (['--blockdev', 'driver=null-co,node-name=a', '--blockdev', 'zz'], "--blockdev zz: Parameter 'driver' does not accept value 'zz'"),
    (['--blockdev', 'null-co,node-name=a,size=1k'], "--blockdev null-co,node-name=a,size=1k: Parameter 'size' expects integer"),
    (['--blockdev', 'null-co,node-name=a,size=abc'], "--blockdev null-co,node-name=a,size=abc: Parameter 'size' expects integer"),
    (['--blockdev', 'null-co,node-name=a,latency-ns=abc'], "--blockdev null-co,node-name=a,latency-ns=abc: Parameter 'latency-ns' expects integer"),
    (['--blockdev', 'null-co,node-name=a,latency-ns=-1'], None),
    (['--blockdev', 'null-co,node-name=a,latency-ns=1k'], "--blockdev null-co,node-name=a,latency-ns=1k: Parameter 'latency-ns' expects integer"),
    (['--blockdev', 'null-co,node-name=a,read-zeroes=maybe'], "--blockdev null-co,node-name=a,read-zeroes=maybe: Parameter 'read-zeroes' expects 'on' or 'off'"),
    (['--blockdev', 'null-co,node-name=a,read-zeroes=yes'], None),
    (['--blockdev', 'null-co,node-name=a,read-zeroes=true'], None),
    (['--blockdev', 'null-co,node-name=a,read-zeroes=y'], None),
    (['--blockdev', 'null-co,node-name=a,read-zeroes'], "--blockdev null-co,node-name=a,read-zeroes: Expected '=' after parameter 'read-zeroes'"),
    (['--blockdev', 'null-co,node-name=a,read-zeroes='], "--blockdev null-co,node-name=a,read-zeroes=: Parameter 'read-zeroes' expects 'on' or 'off'"),
    (['--blockdev', 'null-co,node-name=a,node-name=b'], None),
    (['--blockdev', 'null-co,node-name=a,,b'], None),
    (['--blockdev', 'null-co,node-name'], "--blockdev null-co,node-name: Expected '=' after parameter 'node-name'"),
    (['--blockdev', 'null-co,,x,node-name=a'], "--blockdev null-co,,x,node-name=a: Invalid parameter ''"),
    (['--blockdev', 'null-co,node-name=a,cache.direct=on,cache=x'], "--blockdev null-co,node-name=a,cache.direct=on,cache=x: Parameters 'cache.*' used inconsistently"),
    (['--blockdev', 'null-co,node-name=a,cache=x,cache.direct=on'], "--blockdev null-co,node-name=a,cache=x,cache.direct=on: Parameters 'cache.*' used inconsistently"),
    (['--blockdev', 'null-co,node-name=a,cache.direct=x'], "--blockdev null-co,node-name=a,cache.direct=x: Parameter 'cache.direct' expects 'on' or 'off'"),
    (['--blockdev', 'null-co,node-name=a,cache.zz=on'], "--blockdev null-co,node-name=a,cache.zz=on: Parameter 'cache.zz' is unexpected"),
    (['--blockdev', 'null-co,node-name=a,zz=on'], "--blockdev null-co,node-name=a,zz=on: Parameter 'zz' is unexpected"),
    (['--blockdev', 'null-co,node-name=a,size=0x10'], None),
    (['--blockdev', 'null-co,node-name=a,size=010'], None),
    (['--blockdev', 'null-co,node-name=a,size=-1'], None),
    (['--blockdev', 'null-co,node-name=a,size=9223372036854775808'], "--blockdev null-co,node-name=a,size=9223372036854775808: Parameter 'size' expects integer"),
    (['--blockdev', 'null-co,node-name=a,size= 1'], None),
    (['--blockdev', 'null-co,node-name=a,size=1 '], "--blockdev null-co,node-name=a,size=1 : Parameter 'size' expects integer"),
    (['--blockdev', 'null-co,node-name=a,size='], "--blockdev null-co,node-name=a,size=: Parameter 'size' expects integer"),
    (['--blockdev', 'node-name=a'], "--blockdev node-name=a: Parameter 'driver' is missing"),
    (['--blockdev', ''], "--blockdev : Parameter 'driver' is missing"),
    (['--blockdev', 'null-co,node-name=a,'], None),
    (['--blockdev', 'null-co,,node-name=a'], "--blockdev null-co,,node-name=a: Invalid parameter ''"),
    (['--blockdev', 'null-co,node-name=a,,'], None),
    (['--blockdev', ',node-name=a'], "--blockdev ,node-name=a: Invalid parameter ''"),
    (['--blockdev', 'null-co,=x'], "--blockdev null-co,=x: Invalid parameter ''"),
    (['--blockdev', 'null-co,a..b=x'], "--blockdev null-co,a..b=x: Invalid parameter 'a..b'"),
    (['--blockdev', 'null-co,.a=x'], "--blockdev null-co,.a=x: Invalid parameter '.a'"),
    (['--blockdev', 'null-co,a.=x'], "--blockdev null-co,a.=x: Invalid parameter 'a.'"),
    (['--blockdev', 'null-co,a b=x'], "--blockdev null-co,a b=x: Invalid parameter 'a b'"),
    (['--blockdev', 'null-co,a_b=x'], "--blockdev null-co,a_b=x: Parameter 'a_b' is unexpected"),
    (['--blockdev', 'null-co,1=x'], "--blockdev null-co,1=x: Invalid parameter '1'"),
    (['--blockdev', 'null-co,a.1=x,a.b=y'], "--blockdev null-co,a.1=x,a.b=y: Parameters 'a.*' used inconsistently"),
    (['--blockdev', 'null-co,a.0=x,a.2=y'], "--blockdev null-co,a.0=x,a.2=y: Parameter 'a.1' missing"),
    (['--blockdev', 'null-co,a.1=x,a.0=y'], "--blockdev null-co,a.1=x,a.0=y: Parameter 'a' is unexpected"),
    (['--blockdev', 'null-co,node-name=a,driver=null-aio'], None),
    (['--blockdev', 'driver=null-co,null-aio'], "--blockdev driver=null-co,null-aio: Expected '=' after parameter 'null-aio'"),
    (['--blockdev', '{"driver":"null-co"}'], None),
    (['--blockdev', '{"driver":"null-co", "node-name": "a", "size": "1"}'], '--blockdev {"driver":"null-co", "node-name": "a", "size": "1"}: Invalid parameter type for \'size\', expected: integer'),
    (['--blockdev', '{bad json'], "--blockdev {bad json: JSON parse error, invalid keyword 'bad'"),
    (['--blockdev', ' {"driver":"null-co"}'], '--blockdev  {"driver":"null-co"}: Parameter \'driver\' does not accept value \' {"driver":"null-co"}\''),
    (['--object', 'throttle-group,id=tg0,limits.bps-total=1000'], None),
    (['--object', 'throttle-group,id=tg0,x-bps-total=1000'], None),
    (['--object', 'throttle-group,id=tg0,limits.bps-total=1k'], "--object throttle-group,id=tg0,limits.bps-total=1k: Parameter 'limits.bps-total' expects integer"),
    (['--object', 'throttle-group,id=tg0,limits.bps-total=x'], "--object throttle-group,id=tg0,limits.bps-total=x: Parameter 'limits.bps-total' expects integer"),
    (['--object', 'throttle-group,id=tg0,limits.zz=x'], "--object throttle-group,id=tg0,limits.zz=x: Parameter 'limits.zz' is unexpected"),
    (['--object', 'throttle-group,id=tg0,limits=x'], "--object throttle-group,id=tg0,limits=x: Invalid parameter type for 'limits', expected: object"),
    (['--object', 'throttle-group'], "--object throttle-group: Parameter 'id' is missing"),
    (['--object', 'id=x'], "--object id=x: Parameter 'qom-type' is missing"),
    (['--object', 'qom-type=throttle-group,id=tg0'], None),
    (['--object', '{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":1000}}'], None),
    (['--object', '{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":"1000"}}'], '--object {"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":"1000"}}: Invalid parameter type for \'limits.bps-total\', expected: integer'),
    (['--nbd-server', 'addr.type=unix,addr.path=/run/t/n1.sock,max-connections=x'], "--nbd-server addr.type=unix,addr.path=/run/t/n1.sock,max-connections=x: Parameter 'max-connections' expects integer"),
    (['--nbd-server', 'addr.type=unix,addr.path=/run/t/n1.sock,max-connections=4294967296'], "--nbd-server addr.type=unix,addr.path=/run/t/n1.sock,max-connections=4294967296: Parameter 'max-connections' expects uint32_t"),
    (['--nbd-server', 'addr.type=unix,addr.path=/run/t/n1.sock,max-connections=-1'], "--nbd-server addr.type=unix,addr.path=/run/t/n1.sock,max-connections=-1: Parameter 'max-connections' expects uint32_t"),
    (['--nbd-server', 'addr.type=unix,addr.path=/run/t/n1.sock,max-connections=1k'], "--nbd-server addr.type=unix,addr.path=/run/t/n1.sock,max-connections=1k: Parameter 'max-connections' expects integer"),
    (['--nbd-server', 'addr.type=unix'], "--nbd-server addr.type=unix: Parameter 'addr.path' is missing"),
    (['--nbd-server', 'addr.type=zz'], "--nbd-server addr.type=zz: Parameter 'type' does not accept value 'zz'"),
    (['--nbd-server', 'addr.path=/x'], "--nbd-server addr.path=/x: Parameter 'addr.type' is missing"),
    (['--nbd-server', 'addr.type=inet,addr.host=localhost,addr.port=0,addr.to=70000'], "--nbd-server addr.type=inet,addr.host=localhost,addr.port=0,addr.to=70000: Parameter 'to' expects uint16_t"),
    (['--nbd-server', 'addr.type=inet,addr.host=localhost,addr.port=0,addr.to=x'], "--nbd-server addr.type=inet,addr.host=localhost,addr.port=0,addr.to=x: Parameter 'addr.to' expects integer"),
    (['--nbd-server', 'addr.type=unix,addr.data.path=/x'], "--nbd-server addr.type=unix,addr.data.path=/x: Parameter 'addr.path' is missing"),
    (['--nbd-server', 'unix'], "--nbd-server unix: Expected '=' after parameter 'unix'"),
    (['--nbd-server', '{"addr":{"type":"unix","path":"/run/t/n2.sock"}}'], None),
    (['--nbd-server', 'addr.type=unix,addr.path=/run/t/n3.sock'], None),
    (['--nbd-server', 'addr.type=unix,addr.path=/run/t/n3.sock', '--nbd-server', 'addr.type=unix,addr.path=/run/t/n4.sock'], None),
    (['--export', 'nbd,id=e,node-name=n'], None),
    (['--export', 'type=nbd,id=e,node-name=n,zz=1'], "--export type=nbd,id=e,node-name=n,zz=1: Parameter 'zz' is unexpected"),
    (['--export', 'id=e,node-name=n'], "--export id=e,node-name=n: Parameter 'type' is missing"),
    (['--export', 'nbd,node-name=n'], "--export nbd,node-name=n: Parameter 'id' is missing"),
    (['--export', 'nbd,id=e,node-name=n,bitmaps.0=b'], None),
    (['--export', 'nbd,id=e,node-name=n,bitmap=b'], "--export nbd,id=e,node-name=n,bitmap=b: Parameter 'bitmap' is unexpected"),
    (['--export', 'nbd,id=e,node-name=n,writable=maybe'], "--export nbd,id=e,node-name=n,writable=maybe: Parameter 'writable' expects 'on' or 'off'"),
    (['--blockdev', 'null-co,node-name=n', '--export', 'nbd,id=e,node-name=n'], None),
    (['--blockdev', 'null-co,node-name=n', '--nbd-server', 'addr.type=unix,addr.path=/run/t/n5.sock', '--export', 'nbd,id=e,node-name=n,bitmaps.0=b'], None),
    (['--blockdev', 'null-co,node-name=n', '--nbd-server', 'addr.type=unix,addr.path=/run/t/n5.sock', '--export', 'nbd,id=e,node-name=n,bitmaps.0.node=n,bitmaps.0.name=b'], None),
    (['--blockdev', 'null-co,node-name=n', '--nbd-server', 'addr.type=unix,addr.path=/run/t/n6.sock', '--export', 'nbd,id=e,node-name=n,writable=on'], None),
    (['--chardev', 'socket,id=c,path=/run/t/c1.sock,server=on,wait=off'], None),
    (['--chardev', 'socket,id=c,path=/run/t/c1.sock,server=maybe,wait=off'], "--chardev socket,id=c,path=/run/t/c1.sock,server=maybe,wait=off: Parameter 'server' expects 'on' or 'off'"),
    (['--chardev', 'socket,path=/run/t/c1.sock,server=on,wait=off'], '--chardev socket,path=/run/t/c1.sock,server=on,wait=off: chardev: no id specified'),
    (['--chardev', 'bogus,id=c'], "--chardev bogus,id=c: 'bogus' is not a valid char driver name"),
    (['--chardev', 'socket,id=c,path=/run/t/c1.sock,server=on,wait=off,zz=1'], "--chardev socket,id=c,path=/run/t/c1.sock,server=on,wait=off,zz=1: Invalid parameter 'zz'"),
    (['--chardev', 'socket,id=c,path=/run/t/c1.sock,server,nowait'], None),
    (['--chardev', 'socket,id=c,host=localhost,port=0,server=on,wait=off'], None),
    (['--monitor', 'zz'], None),
    (['--monitor', 'chardev=zz'], None),
    (['--chardev', 'socket,id=c,path=/run/t/c2.sock,server=on,wait=off', '--monitor', 'c,mode=readline'], None),
    (['--chardev', 'socket,id=c,path=/run/t/c2.sock,server=on,wait=off', '--monitor', 'c,mode=control,pretty=on'], None),
    (['--chardev', 'socket,id=c,path=/run/t/c2.sock,server=on,wait=off', '--monitor', 'c,pretty'], "--monitor c,pretty: Expected '=' after parameter 'pretty'"),
    (['--chardev', 'socket,id=c,path=/run/t/c2.sock,server=on,wait=off', '--monitor', 'c,id=m1'], None),
    (['--chardev', 'socket,id=c,path=/run/t/c2.sock,server=on,wait=off', '--monitor', 'c,zz=1'], "--monitor c,zz=1: Parameter 'zz' is unexpected"),
    (['--monitor', ''], "--monitor : Parameter 'chardev' is missing"),
    (['--pidfile=/run/t/p1'], None),
    (['--pidfile', '/run/t/p1', '--pidfile', '/run/t/p2'], None),
    (['--daemonize=x'], "getopt:option '--daemonize' doesn't allow an argument"),
    (['--daemonize'], None),
    (['-T', 'foo'], None),
    (['-Tfoo'], None),
    (['--trace=foo'], None),
    (['-h', '--bogus'], 'help'),
    (['--bogus', '-h'], "getopt:unrecognized option '--bogus'"),
    (['-V', '-h'], 'version'),
    (['--object', 'zz', '-h'], 'help'),
    (['--blockd', 'null-co,node-name=a'], None),
    (['--pid', '/run/t/p'], None),
    (['--export=nbd,id=e'], "--export=nbd,id=e: Parameter 'node-name' is missing"),
    (['--blockdev='], "--blockdev=: Parameter 'driver' is missing"),
    (['-'], '-: Unexpected argument'),
    (['-hV'], 'help'),
    (['--help=x'], "getopt:option '--help' doesn't allow an argument"),
    (['--blockdev', 'help'], '--blockdev help: Help is not available for this option'),
    (['--blockdev', 'null-co,help'], '--blockdev null-co,help: Help is not available for this option'),
    (['--blockdev', 'driver=null-co,help'], '--blockdev driver=null-co,help: Help is not available for this option'),
    (['--blockdev', '?'], '--blockdev ?: Help is not available for this option'),
    (['--nbd-server', 'help'], '--nbd-server help: Help is not available for this option'),
    (['--export', 'help'], '--export help: Help is not available for this option'),
    (['--monitor', 'help'], '--monitor help: Help is not available for this option'),
    (['--blockdev', 'raw,node-name=r,file=nope'], None),
    (['--blockdev', 'raw,node-name=r,file.driver=null-co,file.zz=1'], "--blockdev raw,node-name=r,file.driver=null-co,file.zz=1: Parameter 'file.zz' is unexpected"),
    (['--blockdev', 'raw,node-name=r,file.driver=null-co,file.size=x'], "--blockdev raw,node-name=r,file.driver=null-co,file.size=x: Parameter 'file.size' expects integer"),
    (['--blockdev', 'qcow2,node-name=r,file=nope,backing='], None),
    (['--blockdev', 'qcow2,node-name=r,file=nope,backing=null'], None),
    (['--blockdev', 'qcow2,node-name=r,file=nope,backing.driver=null-co'], None),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error.0.event=bogus'], "--blockdev raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error.0.event=bogus: Parameter 'event' does not accept value 'bogus'"),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error.0.event=read_aio,file.inject-error.0.errno=x'], "--blockdev raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error.0.event=read_aio,file.inject-error.0.errno=x: Parameter 'file.inject-error.0.errno' expects integer"),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error.0.event=read_aio,file.inject-error.1.zz=1'], "--blockdev raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error.0.event=read_aio,file.inject-error.1.zz=1: Parameter 'file.inject-error.1.event' is missing"),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error=x'], "--blockdev raw,node-name=r,file.driver=blkdebug,file.image=nope,file.inject-error=x: Invalid parameter type for 'file.inject-error', expected: array"),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.take-child-perms.0=zz'], "--blockdev raw,node-name=r,file.driver=blkdebug,file.image=nope,file.take-child-perms.0=zz: Parameter 'null' does not accept value 'zz'"),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.max-transfer=99999999999'], "--blockdev raw,node-name=r,file.driver=blkdebug,file.image=nope,file.max-transfer=99999999999: Parameter 'max-transfer' expects int32_t"),
    (['--blockdev', 'raw,node-name=r,file.driver=blkdebug,file.image=nope,file.max-transfer=0x10'], None),
    (['--blockdev', 'null-co,node-name.x=1'], "--blockdev null-co,node-name.x=1: Parameters 'node-name.*' are unexpected"),
    (['--blockdev', 'null-co,node-name=n,cache.direct.x=1'], "--blockdev null-co,node-name=n,cache.direct.x=1: Parameters 'cache.direct.*' are unexpected"),
    (['--blockdev', 'null-co,aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=1'], "--blockdev null-co,aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=1: Parameter 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa' is too long"),
    (['--blockdev', 'null-co,x.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=1'], "--blockdev null-co,x.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=1: Parameter fragment 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa' is too long"),
    (['--blockdev', 'null-co,__com.redhat_x=1'], "--blockdev null-co,__com.redhat_x=1: Parameter '__com.redhat_x' is unexpected"),
    (['--blockdev', 'null-co,a.b=1,a.0=2'], "--blockdev null-co,a.b=1,a.0=2: Parameters 'a.*' used inconsistently"),
    (['--blockdev', 'null-co,a.0.b=1,a.0.0=2'], "--blockdev null-co,a.0.b=1,a.0.0=2: Parameters 'a.0.*' used inconsistently"),
    (['--blockdev', 'null-co,node-name=n,read-only=on,read-only=off'], None),
    (['--blockdev', 'null-co,node-name=n,size=1,size=x'], "--blockdev null-co,node-name=n,size=1,size=x: Parameter 'size' expects integer"),
    (['--blockdev', 'null-co,node-name=n,detect-zeroes=bogus'], "--blockdev null-co,node-name=n,detect-zeroes=bogus: Parameter 'detect-zeroes' does not accept value 'bogus'"),
    (['--blockdev', 'null-co,node-name=n,discard=bogus'], "--blockdev null-co,node-name=n,discard=bogus: Parameter 'discard' does not accept value 'bogus'"),
    (['--blockdev', 'file,node-name=n,filename=/nonexist,aio=bogus'], "--blockdev file,node-name=n,filename=/nonexist,aio=bogus: Parameter 'aio' does not accept value 'bogus'"),
    (['--blockdev', 'throttle,node-name=n,file=x'], "--blockdev throttle,node-name=n,file=x: Parameter 'throttle-group' is missing"),
    (['--blockdev', 'copy-on-read,node-name=n'], "--blockdev copy-on-read,node-name=n: Parameter 'file' is missing"),
    (['--blockdev', '{"driver":"raw","node-name":"r","file":{"driver":"blkdebug","image":"nope","take-child-perms":["zz"]}}'], '--blockdev {"driver":"raw","node-name":"r","file":{"driver":"blkdebug","image":"nope","take-child-perms":["zz"]}}: Parameter \'null\' does not accept value \'zz\''),
    (['--object', 'throttle-group,id=tg0,x-bps-total=1,limits.bps-total=2'], None),
    (['--object', 'throttle-group,id=tg0,zz=1'], "--object throttle-group,id=tg0,zz=1: Parameter 'zz' is unexpected"),
    (['--object', 'throttle-group,id=tg0,limits.iops-size=-1'], None),
    (['--object', 'throttle-group,id=tg0,limits.iops-size=0x10'], None),
    (['--object', 'throttle-group,qom-type=x,id=t'], "--object throttle-group,qom-type=x,id=t: Parameter 'qom-type' does not accept value 'x'"),
    (['--chardev', 'socket,id=c,host=localhost'], '--chardev socket,id=c,host=localhost: chardev: socket: no port given'),
    (['--chardev', 'id=c,path=/run/t/xx.sock,server=on,wait=off'], '--chardev id=c,path=/run/t/xx.sock,server=on,wait=off: chardev: "c" missing backend'),
    (['--chardev', 'socket,id=c,path=/run/t/xx.sock,server=on,wait=off,size=5'], None),
    (['--chardev', 'socket,id=c,path=/run/t/xx.sock,server=on,wait=off,id=d'], None),
    (['--chardev', 'socket,id=c,path=/run/t/xx.sock,server=yes,wait=off'], None),
    (['--chardev', 'socket,id=c,path=/run/t/xx.sock,server=on,wait=off', '--chardev', 'socket,id=c,path=/run/t/xy.sock,server=on,wait=off'], None),
    (['--chardev', 'socket,id=c,path=/run/t/xx.sock,,a,server=on,wait=off'], None),
    (['--chardev', ''], '--chardev : chardev: no id specified'),
    (['--chardev', 'socket,id=c,path=/run/t/xx.sock,server=on,wait=off,noserver'], "--chardev socket,id=c,path=/run/t/xx.sock,server=on,wait=off,noserver: 'wait' option is incompatible with socket in client connect mode"),
    (['--chardev', 'backend=socket,id=c,path=/run/t/xz.sock,server=on,wait=off'], None),
    (['--chardev', 'socket,id=c,path=/run/t/xz.sock,server=on,wait=off,=x'], "--chardev socket,id=c,path=/run/t/xz.sock,server=on,wait=off,=x: Invalid parameter ''"),
    (['--chardev', 'socket,id=c,path=/run/t/xz.sock,server=on,wait=off,,'], "--chardev socket,id=c,path=/run/t/xz.sock,server=on,wait=off,,: Parameter 'wait' expects 'on' or 'off'"),
]


@pytest.mark.parametrize(("argv", "expected"), CMDLINE_CASES)
def test_cmdline_matches_qsd(argv, expected):
    try:
        config = parse_cmdline(argv)
    except CmdlineError as err:
        got = ("getopt:" if err.from_getopt else "") + err.msg
    else:
        got = "help" if config.show_help else "version" if config.show_version else None
    assert got == expected


def test_exit_code():
    assert EXIT_FAILURE == 1


def test_actions_keep_command_line_order():
    config = parse_cmdline([
        "--chardev", "socket,id=m0,path=/run/t/qmp.sock,server=on,wait=off",
        "--blockdev", "null-co,node-name=n0",
        "--object", "throttle-group,id=tg0,limits.iops-total=10",
        "--blockdev=throttle,node-name=t0,throttle-group=tg0,file=n0",
        "--nbd-server", "addr.type=unix,addr.path=/run/t/nbd.sock",
        "--export", "nbd,id=e0,node-name=t0,writable=on",
        "--monitor", "m0",
        "--pidfile", "/run/t/pid",
        "--daemonize",
        "--workers", "3",
        "-T", "ignored",
    ])
    assert [kind for kind, _ in config.actions] == [
        "chardev", "blockdev", "object", "blockdev", "nbd-server", "export", "monitor"]
    assert config.actions[3][1] == {
        "driver": "throttle", "node-name": "t0", "throttle-group": "tg0", "file": "n0"}
    assert config.actions[2][1] == {
        "qom-type": "throttle-group", "id": "tg0", "limits": {"iops-total": 10}}
    assert config.actions[5][1] == {"type": "nbd", "id": "e0", "node-name": "t0", "writable": True}
    assert config.actions[6][1] == {"chardev": "m0"}
    assert (config.pidfile, config.daemonize, config.workers) == ("/run/t/pid", True, 3)
    assert not config.show_help and not config.show_version


def test_defaults():
    assert parse_cmdline([]) == DaemonConfig()


def test_json_and_keyval_blockdev_are_equal():
    keyval = parse_cmdline(["--blockdev", "raw,node-name=r,file.driver=file,file.filename=/i,read-only=on"])
    as_json = parse_cmdline(["--blockdev", '{"driver":"raw","node-name":"r","read-only":true,'
                             '"file":{"driver":"file","filename":"/i"}}'])
    assert keyval.actions == as_json.actions


def test_json_and_keyval_object_are_equal():
    keyval = parse_cmdline(["--object", "throttle-group,id=tg0,limits.bps-total=1000"])
    as_json = parse_cmdline(["--object", '{"qom-type":"throttle-group","id":"tg0","limits":{"bps-total":1000}}'])
    assert keyval.actions == as_json.actions


def test_nbd_server_shape_and_legacy_conversion():
    config = parse_cmdline(["--nbd-server", "addr.type=unix,addr.path=/run/t/n.sock,max-connections=2"])
    kind, options = config.actions[0]
    assert kind == "nbd-server"
    assert options == {"addr": {"type": "unix", "path": "/run/t/n.sock"}, "max-connections": 2}
    assert nbd_server_start_args(options) == {
        "addr": {"type": "unix", "data": {"path": "/run/t/n.sock"}}, "max-connections": 2}
    inet = parse_cmdline(["--nbd-server", "addr.type=inet,addr.host=127.0.0.1,addr.port=10809"])
    assert nbd_server_start_args(inet.actions[0][1]) == {
        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}}


def test_chardev_shapes():
    unix = parse_cmdline(["--chardev", "socket,id=m,path=/run/t/m.sock,server=on,wait=off"])
    assert unix.actions == [("chardev", {"id": "m", "backend": {"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": "/run/t/m.sock"}}, "server": True, "wait": False}}})]
    tcp = parse_cmdline(["--chardev", "socket,id=t,host=localhost,port=4444,server=on,wait=off"])
    assert tcp.actions[0][1]["backend"]["data"]["addr"] == {
        "type": "inet", "data": {"host": "localhost", "port": "4444"}}
    client = parse_cmdline(["--chardev", "socket,id=c,path=/run/t/c.sock"])
    assert client.actions[0][1]["backend"]["data"]["server"] is False


def test_chardev_short_form_warnings():
    config = parse_cmdline(["--chardev", "socket,id=c,path=/run/t/c.sock,server,nowait"])
    where = "--chardev socket,id=c,path=/run/t/c.sock,server,nowait"
    assert config.warnings == [
        f"{where}: warning: short-form boolean option 'server' deprecated\nPlease use server=on instead",
        f"{where}: warning: short-form boolean option 'nowait' deprecated\nPlease use wait=off instead",
    ]
    assert config.actions[0][1]["backend"]["data"]["wait"] is False


def test_chardev_warnings_survive_an_error():
    with pytest.raises(CmdlineError) as info:
        parse_cmdline(["--chardev", "socket,id=c,path=/run/t/c.sock,noserver,wait=off"])
    assert info.value.msg.endswith("'wait' option is incompatible with socket in client connect mode")
    assert len(info.value.warnings) == 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--chardev", "socket,id=c"], "--chardev socket,id=c: Unable to parse FD number "),
        (["--chardev", "socket,id=c,fd=x"], "--chardev socket,id=c,fd=x: Unable to parse FD number x"),
        (["--chardev", "socket,id=c,path=/p,server=on,wait=off,tls-authz=x"],
         "--chardev socket,id=c,path=/p,server=on,wait=off,tls-authz=x: 'tls_authz' option requires 'tls_creds' option"),
        (["--chardev", "socket,id=c,host=h,port=0,to=x"],
         "--chardev socket,id=c,host=h,port=0,to=x: Parameter 'to' expects a number"),
        (["--workers", "0"], "--workers 0: Parameter 'workers' expects a positive integer"),
        (["--workers=x"], "--workers=x: Parameter 'workers' expects a positive integer"),
    ],
)
def test_more_errors(argv, expected):
    with pytest.raises(CmdlineError) as info:
        parse_cmdline(argv)
    assert info.value.msg == expected
    assert not info.value.from_getopt


def test_monitor_mode_is_left_to_the_caller():
    config = parse_cmdline(["--monitor", "c,mode=readline"])
    assert config.actions == [("monitor", {"chardev": "c", "mode": "readline"})]


def test_double_dash_ends_options():
    assert parse_cmdline(["--", "--object", "zz", "extra"]) == DaemonConfig()
