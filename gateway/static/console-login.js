// The operator sign-in form: posts the token once; the gateway answers 204 with an
// HttpOnly session cookie (common/operator_session.py), then the console opens.
"use strict";

document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const error = document.getElementById("error");
  error.textContent = "";
  const body = new URLSearchParams({ token: document.getElementById("token").value });
  try {
    const resp = await fetch("/operator/login", { method: "POST", body, credentials: "same-origin" });
    if (resp.status === 204) {
      location.assign("/admin/");
      return;
    }
    const problem = await resp.json().catch(() => ({}));
    error.textContent = problem.detail || `Sign-in failed (HTTP ${resp.status}).`;
  } catch (e) {
    error.textContent = `The gateway did not answer (${e.message}).`;
  }
});
