// An unmodified fetch() caller for Node 20, configured only by the environment.
// Node 20's built-in fetch ignores HTTPS_PROXY (NODE_USE_ENV_PROXY arrived in Node 22.21/24.5),
// so the two lines below install undici's EnvHttpProxyAgent, which reads HTTPS_PROXY/NO_PROXY
// from the environment; the CA comes from NODE_EXTRA_CA_CERTS. Newer Node: delete them and set
// NODE_USE_ENV_PROXY=1 (what `connection-proxy run` does).
import { EnvHttpProxyAgent, setGlobalDispatcher, fetch as ufetch } from "undici";
setGlobalDispatcher(new EnvHttpProxyAgent());

for (const url of process.argv.slice(2)) {
  if (url.startsWith("sleep:")) {
    await new Promise((r) => setTimeout(r, Number(url.slice(6)) * 1000));
    continue;
  }
  try {
    const r = await ufetch(url, { headers: { Authorization: "Bearer caller-own" } });
    const body = await r.text();
    console.log(JSON.stringify({ status: r.status, proxy_error: r.headers.get("x-proxy-error"), body }));
  } catch (e) {
    console.log(JSON.stringify({ error: `${e}: ${e.cause ?? ""}`.slice(0, 500) }));
  }
}
