// Shows the server's ?error= message, if any, and keeps the room the user was sent from.
"use strict";
(function () {
  const params = new URLSearchParams(window.location.search);
  const error = params.get("error");
  if (error) {
    const box = document.getElementById("login-error");
    box.textContent = error;
    box.hidden = false;
  }
  const input = document.getElementById("username");
  const form = document.getElementById("login-form");
  form.addEventListener("submit", function (e) {
    if (!input.value.trim()) {
      e.preventDefault();
      input.value = "";
      input.focus();
    }
  });
})();
