// Shows the server's ?error= code as fixed text (never text taken from the URL), and
// refuses an empty name before sending it.
"use strict";
(function () {
  const MESSAGES = {
    invalid_input: "这个昵称不能用，请换一个。",
    too_long: "昵称太长了，请短一点。",
    name_reserved: "这是小X自己的名字，请换一个昵称。",
    name_not_one_line: "昵称只能是一行文字。",
    rate_limited: "登录太频繁了，请稍后再试。",
  };
  const params = new URLSearchParams(window.location.search);
  const code = params.get("error");
  if (code) {
    const box = document.getElementById("login-error");
    box.textContent = Object.prototype.hasOwnProperty.call(MESSAGES, code)
      ? MESSAGES[code] : "登录失败，请重试。";
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
