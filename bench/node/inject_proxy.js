// Node's http-proxy (npm) doing connection-proxy's job with nothing else: forward every call to
// one upstream with one credential header set, the caller's own value of it replaced.
// The reference row of bench/proxy.py; started by bench/_refservers.py start_node_http_proxy.
//
// node inject_proxy.js --port P --upstream URL --header "Name: value"
//                      [--strip-prefix /proxy] [--drop-header Name ...]
//
// Upstream connections are kept alive (one Agent, no socket limit), as the aiohttp
// pass-through's ClientSession and nginx's `keepalive` pool do. /healthz answers "ok" locally.
"use strict";

const http = require("http");
const httpProxy = require("http-proxy");

function parseArgs(argv) {
  const out = { drop: [] };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--port") out.port = Number(value);
    else if (flag === "--upstream") out.upstream = value;
    else if (flag === "--header") out.header = value;
    else if (flag === "--strip-prefix") out.prefix = value.replace(/\/+$/, "");
    else if (flag === "--drop-header") out.drop.push(value.toLowerCase());
    else throw new Error(`unknown option ${flag}`);
  }
  if (!out.port || !out.upstream || !out.header) throw new Error("--port, --upstream and --header are required");
  const colon = out.header.indexOf(":");
  if (colon < 1) throw new Error("--header must be 'Name: value'");
  out.headerName = out.header.slice(0, colon).trim();
  out.headerValue = out.header.slice(colon + 1).trim();
  return out;
}

const opts = parseArgs(process.argv.slice(2));
const agent = new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 1024 });
const proxy = httpProxy.createProxyServer({ target: opts.upstream, agent, xfwd: false });

proxy.on("proxyReq", (proxyReq) => {
  proxyReq.setHeader(opts.headerName, opts.headerValue);
  for (const name of opts.drop) proxyReq.removeHeader(name);
});
proxy.on("error", (err, req, res) => {
  if (!res.headersSent) res.writeHead(502, { "Content-Type": "text/plain" });
  res.end(`upstream error: ${err.code || err.message}\n`);
});

const server = http.createServer((req, res) => {
  if (req.url === "/healthz") {
    res.writeHead(200, { "Content-Type": "text/plain" });
    res.end("ok");
    return;
  }
  if (opts.prefix) {
    if (req.url !== opts.prefix && !req.url.startsWith(opts.prefix + "/")) {
      res.writeHead(404, { "Content-Type": "text/plain" });
      res.end("not found\n");
      return;
    }
    req.url = req.url.slice(opts.prefix.length) || "/";
  }
  proxy.web(req, res);
});
server.keepAliveTimeout = 75000;
server.headersTimeout = 80000;

function stop() {
  server.close(() => process.exit(0));
  server.closeAllConnections();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", stop);
process.on("SIGINT", stop);

server.listen(opts.port, "127.0.0.1", () => {
  console.log(`node http-proxy listening on 127.0.0.1:${opts.port} -> ${opts.upstream}`);
});
