"""A local stand-in for the Hugging Face hub's file endpoint, enough for `hf-hub` downloads:
GET /{repo}/resolve/{revision}/{file} with Range support and the x-repo-commit / etag headers.

usage: hub_standin.py REPO_ID REVISION DIR     (prints the port, then serves until killed)
"""
import hashlib
import http.server
import os
import sys

REPO, REVISION, ROOT = sys.argv[1], sys.argv[2], sys.argv[3]
COMMIT = hashlib.sha1(f"{REPO}@{REVISION}".encode()).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        prefix = f"/{REPO}/resolve/{REVISION}/"
        name = self.path[len(prefix):] if self.path.startswith(prefix) else None
        path = os.path.join(ROOT, name) if name and "/" not in name and ".." not in name else None
        if path is None or not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        with open(path, "rb") as f:
            data = f.read()
        start, end = 0, len(data) - 1
        header = self.headers.get("Range")
        if header and header.startswith("bytes="):
            first, _, last = header[len("bytes="):].partition("-")
            start = int(first or 0)
            end = min(int(last), len(data) - 1) if last else len(data) - 1
        body = data[start : end + 1]
        self.send_response(206 if header else 200)
        self.send_header("x-repo-commit", COMMIT)
        self.send_header("etag", '"' + hashlib.sha256(data).hexdigest() + '"')
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
