// Keeps the page current: 2 s after each answer, fetch this page's <main>
// (?live=1) and swap it in. One request at a time; skipped while the tab is
// hidden or the operator is using a control inside it (checked again when
// the answer comes), so a half-chosen form is never pulled away. A search
// result page is left as it is: refreshing it would search again.
(function () {
  "use strict";
  const main = document.querySelector("main");
  if (!main || new URL(window.location.href).searchParams.has("q")) return;
  function busy() {
    const active = document.activeElement;
    return document.hidden || (active && active !== document.body && main.contains(active));
  }
  async function refresh() {
    if (busy()) return;
    const url = new URL(window.location.href);
    url.searchParams.set("live", "1");
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      if (r.redirected || r.status === 401) {
        window.location.assign("/login");
        return;
      }
      if (r.ok) {
        const html = await r.text();
        if (!busy()) main.innerHTML = html;
      }
    } catch (e) {
      // The node may be restarting: try again at the next turn.
    }
  }
  async function loop() {
    await refresh();
    window.setTimeout(loop, 2000);
  }
  window.setTimeout(loop, 2000);
})();
