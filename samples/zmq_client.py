"""Ask `wanwu serve`'s ZeroMQ door about photos.  Usage: python zmq_client.py [tcp://HOST:PORT] PHOTO..."""
import json, sys, zmq  # noqa: E401 (a sample that fits on one screen)

args = sys.argv[1:]
address = args.pop(0) if args and "://" in args[0] else "tcp://127.0.0.1:5555"
sock = zmq.Context().socket(zmq.DEALER)
sock.rcvtimeo, sock.linger = 60_000, 0  # give up (zmq.Again) after a minute rather than wait forever
sock.connect(address)
sock.send_multipart([b"1"] + [open(path, "rb").read() for path in args])  # [request id, image, image, ...]
reply = json.loads(sock.recv_multipart()[1])  # [request id, JSON]
for path, record in zip(args, reply.get("records", [])):
    top = record["labels"][0] if record["labels"] else None
    print(f"{path}\t{record['key']}\t" + (f"{top['label']} {top['score']:.3f}" if top else f"错误 {record['error']}"))
sys.exit(f"error: {reply['error']}" if "error" in reply else 0)
