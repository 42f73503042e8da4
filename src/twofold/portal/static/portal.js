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
  });

  // Confirmation before destructive actions.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("dialog[data-open-on-load]").forEach(function (d) { openDialog(d.id); });

    var zone = document.getElementById("dropzone");
    var input = document.getElementById("file");
    var label = document.getElementById("file-name");
    if (!zone || !input) { return; }
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
