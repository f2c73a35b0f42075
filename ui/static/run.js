// The run page's live log: Server-Sent Events from the stored rows. The browser reconnects on
// its own and sends Last-Event-ID, so the server resumes after the last row shown.
(function () {
  "use strict";
  var log = document.getElementById("log");
  if (!log || log.dataset.live !== "yes") { return; }
  var follow = document.getElementById("follow");
  var stateBadge = document.getElementById("state");
  var events = document.querySelector("#events tbody");
  var finished = ["succeeded", "failed", "error", "cancelled", "timed_out", "rejected"];
  var source = new EventSource(log.dataset.events + "?after=" + log.dataset.after);
  window.trimoLog = source;

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
  }

  source.addEventListener("log", function (e) {
    var stick = nearBottom();
    var line = document.createElement("span");
    line.className = "line";
    line.dataset.id = e.lastEventId;
    line.textContent = JSON.parse(e.data) + "\n";
    log.appendChild(line);
    if (stick) { window.scrollTo(0, document.body.scrollHeight); }
  });

  function other(e) {
    var ev = JSON.parse(e.data);
    if (ev.kind === "state" && stateBadge) {
      stateBadge.textContent = ev.message;
      if (finished.indexOf(ev.message) >= 0) {
        follow.innerHTML = "The run ended: <a href=''>reload</a> for its results.";
      }
    }
    if (events) {
      var row = document.createElement("tr");
      row.className = "event kind-" + ev.kind;
      var cells = [new Date().toTimeString().slice(0, 8), ev.kind,
                   ev.message + (ev.data ? " " + JSON.stringify(ev.data) : "")];
      cells.forEach(function (text) {
        var td = document.createElement("td");
        td.textContent = text;
        row.appendChild(td);
      });
      events.appendChild(row);
    }
  }
  // Any kind of event that is not a log line: states, steps of the agent, publishing, ...
  source.onmessage = other;
  source.addEventListener("end", function () {
    source.close();
    follow.textContent = "The run ended.";
  });
  source.onerror = function () {
    if (source.readyState === EventSource.CONNECTING) { follow.textContent = "reconnecting…"; }
  };
  source.onopen = function () { follow.textContent = "following live…"; };
})();
