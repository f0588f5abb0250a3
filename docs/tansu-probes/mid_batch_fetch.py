# Probe of tansu 0.6 behaviour seen by modelwatch (issues #17 and #11); not
# part of the test suite. Needs `pip install confluent-kafka` and the tansu
# binary (deploy/install-tansu.sh prints its path; or set MODELWATCH_TANSU_BIN).
import os
TANSU = os.environ.get("MODELWATCH_TANSU_BIN", os.path.expanduser("~/.cache/modelwatch/tansu-0.6.0/bin/tansu"))
CHILD = "/tmp/modelwatch-static-membership-child.py"
import subprocess, time, socket, sys
from confluent_kafka import Producer, Consumer, TopicPartition
def free_port():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
port=free_port(); url=f"tcp://127.0.0.1:{port}"
b=subprocess.Popen([TANSU,"broker","--listener-url",url,"--advertised-listener-url",url,"--storage-engine","memory://tansu/"],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
try:
    time.sleep(2)
    subprocess.run([TANSU,"topic","create","--broker",url,"--partitions","1","t"],check=True,stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL)
    p=Producer({"bootstrap.servers":f"127.0.0.1:{port}","linger.ms":5,"batch.num.messages":100})
    for i in range(1000):
        if i%100==0: p.flush(10)
        p.produce("t",key=str(i),value=str(i))
    p.flush(30)
    for start in [0, 1, 150, 333, 500, 999]:
        c=Consumer({"bootstrap.servers":f"127.0.0.1:{port}","group.id":f"g{start}","enable.auto.commit":False})
        c.assign([TopicPartition("t",0,start)])
        m=None
        t=time.time()
        while m is None and time.time()-t<10:
            m=c.poll(1)
        print("asked", start, "first delivered", m.offset() if m else None, "value", m.value() if m else None)
        c.close()
    # committed offset then subscribe
    c=Consumer({"bootstrap.servers":f"127.0.0.1:{port}","group.id":"gc","enable.auto.commit":False})
    c.commit(offsets=[TopicPartition("t",0,437)],asynchronous=False)
    c.close()
    c=Consumer({"bootstrap.servers":f"127.0.0.1:{port}","group.id":"gc","enable.auto.commit":False,"auto.offset.reset":"earliest"})
    c.subscribe(["t"])
    m=None; t=time.time()
    while m is None and time.time()-t<20:
        m=c.poll(1)
    print("committed 437, first delivered", m.offset() if m else None)
    c.close()
finally:
    b.kill()
