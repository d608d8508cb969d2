"""Known TCP traffic for tests/probe.rs, in processes whose pid the test knows.

  server HOST N RX TX MODE   listen on HOST:0, print the port, accept N connections; on each,
                              read RX bytes, send TX bytes, then (MODE=normal) wait for the
                              peer's FIN and close, or (MODE=reset) close with SO_LINGER 0,
                              which sends a RST. Prints "done" at the end.
  client HOST PORT N TX RX   N times: connect, send TX bytes, read RX bytes, close. A refused
                              or reset connection prints "refused"/"reset" and continues.
  echo HOST [wait]           listen, print the port, accept one connection, echo every message
                              until EOF. With "wait", read a line from stdin before listening
                              (the test moves the process into a cgroup first, as a container
                              runtime does before the workload starts).
  pinger HOST PORT [thread]  connect, 20 ping-pongs, print "idle", wait for a line on stdin,
                              send one more message ("poke"), read its echo, print "done",
                              wait for a line on stdin, close. With "thread", all that runs in
                              a second thread while the main one, named "ew-main", waits (the
                              connection's thread and the process then have different names);
                              after the close it waits for one more line before exiting.

Each process names its thread (comm) "ew-<role>" so the test can check comm exactly.
"""
import ctypes
import socket
import struct
import sys
import threading


def name(comm):
    ctypes.CDLL(None).prctl(15, comm.encode(), 0, 0, 0)


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def read_exact(sock, n):
    got = 0
    while got < n:
        data = sock.recv(min(65536, n - got))
        if not data:
            raise EOFError("peer closed after %d of %d bytes" % (got, n))
        got += len(data)


def listen(host):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.bind((host, 0))
    s.listen(128)
    print(s.getsockname()[1], flush=True)
    return s


def server(host, n, rx, tx, mode):
    name("ew-server")
    s = listen(host)
    for _ in range(n):
        c, _ = s.accept()
        read_exact(c, rx)
        if mode == "reset":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()
            continue
        c.sendall(b"s" * tx)
        while c.recv(65536):
            pass
        c.close()
    print("done", flush=True)


def client(host, port, n, tx, rx):
    name("ew-client")
    for _ in range(n):
        c = socket.socket(family(host), socket.SOCK_STREAM)
        try:
            c.connect((host, port))
            c.sendall(b"c" * tx)
            read_exact(c, rx)
        except ConnectionRefusedError:
            print("refused", flush=True)
        except (ConnectionResetError, EOFError):
            print("reset", flush=True)
        finally:
            c.close()
    print("done", flush=True)


def echo(host, wait=False):
    name("ew-echo")
    if wait:
        sys.stdin.readline()
    s = listen(host)
    c, _ = s.accept()
    while True:
        data = c.recv(65536)
        if not data:
            break
        c.sendall(data)
    c.close()


def pinger(host, port):
    name("ew-pinger")
    c = socket.create_connection((host, port))
    for _ in range(20):
        c.sendall(b"ping")
        read_exact(c, 4)
    print("idle", flush=True)
    sys.stdin.readline()
    c.sendall(b"poke")
    read_exact(c, 4)
    print("done", flush=True)
    sys.stdin.readline()
    c.close()


if __name__ == "__main__":
    role, args = sys.argv[1], sys.argv[2:]
    if role == "server":
        server(args[0], int(args[1]), int(args[2]), int(args[3]), args[4])
    elif role == "client":
        client(args[0], int(args[1]), int(args[2]), int(args[3]), int(args[4]))
    elif role == "echo":
        echo(args[0], args[1:] == ["wait"])
    elif role == "pinger" and args[2:] == ["thread"]:
        name("ew-main")
        worker = threading.Thread(target=pinger, args=(args[0], int(args[1])))
        worker.start()
        worker.join()
        sys.stdin.readline()
    elif role == "pinger":
        pinger(args[0], int(args[1]))
    else:
        sys.exit("unknown role " + role)
