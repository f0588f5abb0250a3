# Probe of tansu 0.6 behaviour seen by modelwatch (issues #17 and #11); not
# part of the test suite. Needs `pip install confluent-kafka` and the tansu
# binary (deploy/install-tansu.sh prints its path; or set MODELWATCH_TANSU_BIN).
import os
TANSU = os.environ.get("MODELWATCH_TANSU_BIN", os.path.expanduser("~/.cache/modelwatch/tansu-0.6.0/bin/tansu"))
CHILD = "/tmp/modelwatch-static-membership-child.py"
import subprocess, time, socket, sys, os, signal
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
port=free_port(); url=f"tcp://127.0.0.1:{port}"
b=subprocess.Popen([TANSU,"broker","--listener-url",url,"--advertised-listener-url",url,"--storage-engine","memory://tansu/"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
child = r'''
import sys, time
from confluent_kafka import Consumer
conf={"bootstrap.servers":sys.argv[1],"group.id":"g","enable.auto.commit":False,"auto.offset.reset":"earliest"}
if sys.argv[2] != "-": conf["group.instance.id"]=sys.argv[2]
t0=time.time()
c=Consumer(conf)
c.subscribe(["t"])
while True:
    c.poll(0.2)
    a=c.assignment()
    if a:
        print("assigned", len(a), "after", round(time.time()-t0,1), flush=True)
        while True: c.poll(0.5)
    if time.time()-t0>90:
        print("nothing after 90 s", flush=True); sys.exit(1)
'''
open(CHILD,"w").write(child)
try:
    time.sleep(2)
    subprocess.run([TANSU,"topic","create","--broker",url,"--partitions","2","t"],check=True,stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    for inst in ["inst-1", "-"]:
        p=subprocess.Popen([sys.executable,CHILD,f"127.0.0.1:{port}",inst],stdout=subprocess.PIPE,text=True)
        print(inst, "first:", p.stdout.readline().strip())
        p.send_signal(signal.SIGKILL); p.wait()
        time.sleep(1)
        p=subprocess.Popen([sys.executable,CHILD,f"127.0.0.1:{port}",inst],stdout=subprocess.PIPE,text=True)
        print(inst, "restart:", p.stdout.readline().strip())
        p.send_signal(signal.SIGKILL); p.wait()
finally:
    b.kill()
