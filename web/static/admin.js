"use strict";
// The operator's page: the same tables as imagine-admin, refreshed every few seconds.
async function refresh() {
  const answer = await fetch("/api/admin/status");
  if (!answer.ok) return;
  const status = await answer.json();
  for (const name of ["queue", "adapters", "styles"]) document.getElementById(name).textContent = status[name];
}
document.getElementById("reload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const out = document.getElementById("reload-answer");
  out.textContent = "reloading…";
  const answer = await fetch("/api/admin/reload", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({adapter: document.getElementById("reload-name").value.trim()}),
  });
  out.textContent = (await answer.json()).table;
  refresh();
});
refresh();
setInterval(refresh, 3000);
