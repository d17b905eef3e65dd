// The web console's script (services/console.py). Everything that comes from the log (names,
// labels, reasons, actors) is written with textContent, never as HTML. No inline script runs:
// the page hands over what this needs in data attributes of <body>.
"use strict";

(function () {
  const body = document.body;
  const csrf = body.dataset.csrf || "";
  const mayWrite = body.dataset.mayWrite === "1";
  // Set once per page load: a test (or a curious person) can see that the page was never reloaded.
  window.consoleLoadedAt = Date.now() + ":" + Math.random();

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function say(text, bad) {
    const notice = document.getElementById("notice");
    if (!notice) return;
    notice.textContent = text;
    notice.className = bad ? "error" : "muted";
  }

  function live(text) {
    const line = document.getElementById("live");
    if (line) line.textContent = text;
  }

  function ago(iso) {
    if (!iso) return "";
    const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    for (const [size, unit] of [[86400, "d"], [3600, "h"], [60, "m"]]) {
      if (seconds >= size) return Math.floor(seconds / size) + unit + " ago";
    }
    return Math.floor(seconds) + "s ago";
  }

  async function act(name, verb) {
    if (verb === "delete" && !window.confirm("Delete " + name + " and its workspace? There is no undo.")) return;
    say(verb + " " + name + " …");
    try {
      const answer = await fetch("/sandboxes/" + encodeURIComponent(name) + "/" + verb, {
        method: "POST",
        headers: { "X-CSRF-Token": csrf },
        credentials: "same-origin",
      });
      const result = await answer.json();
      if (answer.ok) say(verb + " " + name + ": accepted at log seq " + result.seq);
      else say(verb + " " + name + ": " + result.error.code + ": " + result.error.message, true);
    } catch (err) {
      say(verb + " " + name + ": " + err, true);
    }
  }

  // -- the sandboxes' table (the main page, and one sandbox's page) -----------------------

  const rows = new Map();

  function buttons(row) {
    const cell = el("td", null, "actions");
    if (!mayWrite) return cell;
    for (const verb of ["stop", "start", "delete"]) {
      const button = el("button", verb.charAt(0).toUpperCase() + verb.slice(1), "act-" + verb);
      button.type = "button";
      button.dataset.verb = verb;
      button.addEventListener("click", () => act(row.name, verb));
      cell.appendChild(button);
    }
    return cell;
  }

  function renderRow(row) {
    const tr = el("tr");
    tr.dataset.name = row.name;
    tr.dataset.seq = row.last_seq;
    const nameCell = el("td");
    const link = el("a", row.name);
    link.href = "/sandboxes/" + encodeURIComponent(row.name);
    nameCell.appendChild(link);
    tr.appendChild(nameCell);
    tr.appendChild(el("td", row.phase, "phase phase-" + row.phase));
    tr.appendChild(el("td", row.driver));
    tr.appendChild(el("td", row.host));
    const labels = Object.entries(row.labels || {}).map(([k, v]) => k + "=" + v).join(", ");
    tr.appendChild(el("td", labels, "labels"));
    const updated = el("td", ago(row.updated_at));
    updated.title = row.updated_at || "";
    tr.appendChild(updated);
    tr.appendChild(el("td", row.last_error, "error"));
    tr.appendChild(buttons(row));
    return tr;
  }

  function place(row, matches) {
    const tbody = document.querySelector("#sandboxes tbody");
    const old = rows.get(row.name);
    if (old && Number(old.dataset.seq) > row.last_seq) return; // never back in time
    if (!matches) {
      if (old) old.remove();
      rows.delete(row.name);
      return;
    }
    const tr = renderRow(row);
    if (old) {
      old.replaceWith(tr);
    } else {
      const after = [...rows.keys()].filter((n) => n > row.name).sort()[0];
      tbody.insertBefore(tr, after ? rows.get(after) : null);
    }
    rows.set(row.name, tr);
  }

  function counts(phases) {
    const section = document.getElementById("counts");
    if (!section) return;
    section.replaceChildren();
    for (const [phase, n] of Object.entries(phases)) {
      const item = el("span", null, "count" + (n ? "" : " zero"));
      item.id = "count-" + phase;
      item.appendChild(el("b", n));
      item.appendChild(document.createTextNode(" " + phase));
      section.appendChild(item);
    }
  }

  const TRANSIENT = new Set(["unavailable", "timeout", "outcome_unknown"]);

  // An event already shown (a stream followed again replays its start) is not shown twice.
  function fresh(container, e) {
    return !container.querySelector('[data-seq="' + Number(e.seq) + '"]');
  }

  function follow(url, handlers) {
    const source = new EventSource(url);
    source.addEventListener("open", () => live("live: following the log"));
    source.addEventListener("error", () => live("connection lost; reconnecting…"));
    source.addEventListener("problem", (e) => {
      const problem = JSON.parse(e.data);
      live(problem.code + ": " + problem.message);
      source.close();
      if (TRANSIENT.has(problem.code)) {
        // NATS away longer than the SDK waits: follow again, from a fresh snapshot.
        setTimeout(() => follow(url, handlers), 2000);
      }
    });
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (e) => handle(JSON.parse(e.data)));
    }
    return source;
  }

  function followTable(query) {
    follow("/stream/sandboxes?" + query, {
      snapshot: (data) => {
        document.querySelector("#sandboxes tbody").replaceChildren();
        rows.clear();
        for (const row of data.rows) place(row, true);
        counts(data.counts);
        live("live at log seq " + data.seq);
      },
      row: (data) => place(data.row, data.matches),
      counts: (data) => {
        counts(data.counts);
        live("live at log seq " + data.seq);
      },
    });
  }

  // -- events: the stream page, and one sandbox's timeline ----------------------------------

  function eventRow(e) {
    const tr = el("tr");
    tr.dataset.seq = e.seq;
    tr.appendChild(el("td", e.seq));
    const when = el("td", e.time);
    tr.appendChild(when);
    tr.appendChild(el("td", e.sandbox));
    tr.appendChild(el("td", e.type));
    tr.appendChild(el("td", e.actor));
    tr.appendChild(el("td", e.why));
    return tr;
  }

  function timelineItem(e) {
    const li = el("li");
    li.dataset.seq = e.seq;
    const time = el("time", ago(e.time));
    time.dateTime = e.time;
    time.title = e.time;
    li.appendChild(time);
    li.appendChild(document.createTextNode(" "));
    li.appendChild(el("span", e.actor, "who"));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(el("span", e.type, "what"));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(el("span", e.why, "why"));
    return li;
  }

  const kind = body.dataset.page;
  if (kind === "index") {
    followTable(window.location.search.replace(/^\?/, ""));
  } else if (kind === "sandbox") {
    const name = body.dataset.sandbox;
    followTable("sandbox=" + encodeURIComponent(name));
    const timeline = document.getElementById("timeline");
    follow("/stream/events?sandbox=" + encodeURIComponent(name) + "&since=" + body.dataset.since, {
      event: (e) => fresh(timeline, e) && timeline.appendChild(timelineItem(e)),
    });
  } else if (kind === "events") {
    const tbody = document.querySelector("#events tbody");
    follow("/stream/events" + window.location.search, {
      following: (data) => live("following the log from seq " + data.from),
      event: (e) => fresh(tbody, e) && tbody.appendChild(eventRow(e)),
    });
  }
})();
