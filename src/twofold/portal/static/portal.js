// Progressive enhancement only: every form works without JavaScript.
(function () {
  "use strict";

  function openDialog(id) {
    var d = document.getElementById(id);
    if (d && typeof d.showModal === "function" && !d.open) { d.showModal(); }
  }

  document.addEventListener("click", function (event) {
    var opener = event.target.closest("[data-open]");
    if (opener) { openDialog(opener.getAttribute("data-open")); }
    var closer = event.target.closest("[data-close]");
    if (closer) {
      var d = document.getElementById(closer.getAttribute("data-close"));
      if (d) { d.close(); }
    }
    var copy = event.target.closest("button[data-copy]");
    if (copy) { copyValue(copy); }
  });

  // Confirmation before destructive actions, in the portal's own dialog (not window.confirm).
  var confirmed = null;
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (!question || form === confirmed) { return; }
    var dialog = document.getElementById("confirm-dialog");
    if (!dialog || typeof dialog.showModal !== "function") {
      if (!window.confirm(question)) { event.preventDefault(); }
      return;
    }
    event.preventDefault();
    document.getElementById("confirm-title").textContent =
      form.getAttribute("data-confirm-title") || "Are you sure?";
    document.getElementById("confirm-text").textContent = question;
    document.getElementById("confirm-ok").textContent = form.getAttribute("data-confirm-action") || "Confirm";
    dialog.returnValue = "";
    dialog.onclose = function () {
      dialog.onclose = null;
      if (dialog.returnValue !== "confirm") { return; }
      confirmed = form;
      if (typeof form.requestSubmit === "function") { form.requestSubmit(); } else { form.submit(); }
    };
    dialog.showModal();
  });

  function copyValue(button) {
    var value = button.getAttribute("data-copy");
    var done = function () {
      button.textContent = "Copied";
      button.classList.add("copied");
      window.setTimeout(function () { button.textContent = "Copy"; button.classList.remove("copied"); }, 2000);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(done, function () { selectText(button); });
    } else {
      selectText(button);
    }
  }

  function selectText(button) {
    // No clipboard access: select the whole value so that Ctrl-C copies it.
    var code = button.parentNode.querySelector("code");
    if (!code) { return; }
    var range = document.createRange();
    range.selectNodeContents(code);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("dialog[data-open-on-load]").forEach(function (d) { openDialog(d.id); });
    document.querySelectorAll("button[data-copy]").forEach(function (b) { b.hidden = false; });

    var zone = document.getElementById("dropzone");
    var input = document.getElementById("file");
    var label = document.getElementById("file-name");
    if (!zone || !input) { return; }
    zone.classList.add("enhanced"); // the raw file control is hidden; "browse" opens it
    function show() {
      label.textContent = input.files.length ? "Selected: " + input.files[0].name : "";
      zone.classList.toggle("has-file", input.files.length > 0);
    }
    input.addEventListener("change", show);
    ["dragenter", "dragover"].forEach(function (name) {
      zone.addEventListener(name, function (event) {
        event.preventDefault();
        zone.classList.add("dragging");
      });
    });
    ["dragleave", "drop"].forEach(function (name) {
      zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
    });
    zone.addEventListener("drop", function (event) {
      event.preventDefault();
      var files = event.dataTransfer && event.dataTransfer.files;
      if (!files || !files.length) { return; }
      var transfer = new DataTransfer();
      transfer.items.add(files[0]);
      input.files = transfer.files;
      show();
    });
  });
})();
