// Keeps the page current: every 2 s, fetch this page's <main> (?live=1) and
// swap it in. Skipped while the tab is hidden or the operator is using a
// control inside it, so a half-chosen form is never pulled away.
(function () {
  "use strict";
  const main = document.querySelector("main");
  if (!main) return;
  async function refresh() {
    if (document.hidden) return;
    const active = document.activeElement;
    if (active && active !== document.body && main.contains(active)) return;
    const url = new URL(window.location.href);
    url.searchParams.set("live", "1");
    try {
      const r = await fetch(url, { credentials: "same-origin" });
      if (r.redirected || r.status === 401) {
        window.location.assign("/login");
        return;
      }
      if (r.ok) main.innerHTML = await r.text();
    } catch (e) {
      // The node may be restarting: try again at the next tick.
    }
  }
  window.setInterval(refresh, 2000);
})();
