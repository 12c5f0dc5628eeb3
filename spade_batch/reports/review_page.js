// The review page's behaviour (reports/review_page.py inlines it): pictures, verdicts in local storage, keys,
// filters, the sheet's download and loading a sheet back, where a pixel's nearest normal pixel is. Everything it shows of a name is set as text, never as HTML.
(function () {
  "use strict";
  var state = JSON.parse(document.getElementById("review-state").textContent);
  var pictures = JSON.parse(document.getElementById("pictures").textContent);
  var storageKey = "spade-batch-review\n" + state.key;
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var filter = document.getElementById("filter");
  var message = document.getElementById("message");
  var LABELS = { "": "not reviewed", normal: "normal (a false alarm)", defect: "defect", skip: "skipped" };
  var SHEET_VERDICTS = { normal: true, defect: true };
  var current = 0;
  var verdicts = {};

  Array.prototype.forEach.call(document.querySelectorAll("img[data-picture]"), function (img) {
    img.src = pictures[img.dataset.picture];
  });

  try {
    verdicts = JSON.parse(window.localStorage.getItem(storageKey) || "{}") || {};
  } catch (error) {
    verdicts = {};
  }

  function save() {
    try {
      window.localStorage.setItem(storageKey, JSON.stringify(verdicts));
    } catch (error) {
      message.textContent = "This browser keeps no verdicts across a reload (" + error.name + "): download them before closing.";
    }
  }

  function verdictOf(index) {
    var verdict = verdicts[state.cards[index].id];
    return LABELS.hasOwnProperty(verdict) ? verdict : "";
  }

  function shown(index) {
    var verdict = verdictOf(index);
    return filter.value === "all" || (filter.value === "unreviewed" ? verdict === "" : verdict === filter.value);
  }

  function refresh() {
    var counts = { "": 0, normal: 0, defect: 0, skip: 0 };
    cards.forEach(function (card, index) {
      var verdict = verdictOf(index);
      counts[verdict] += 1;
      card.dataset.verdict = verdict;
      card.querySelector(".verdict-text").textContent = LABELS[verdict];
      Array.prototype.forEach.call(card.querySelectorAll("button.mark"), function (button) {
        button.setAttribute("aria-pressed", String(button.dataset.verdict === verdict));
      });
      card.hidden = !shown(index);
    });
    document.getElementById("progress").textContent = (cards.length - counts[""]) + " of " + cards.length + " reviewed: " +
      counts.normal + " normal, " + counts.defect + " defect, " + counts.skip + " skipped";
  }

  function focusCard(index) {
    current = index;
    cards.forEach(function (card, other) { card.classList.toggle("current", other === index); });
    cards[index].focus();
  }

  function move(step) {
    for (var index = current + step; index >= 0 && index < cards.length; index += step) {
      if (!cards[index].hidden) {
        focusCard(index);
        return true;
      }
    }
    return false;
  }

  function mark(index, verdict) {
    verdicts[state.cards[index].id] = verdict;
    save();
    refresh();
    current = index;
    if (!move(1) && !cards[index].hidden) {
      focusCard(index);
    }
  }

  function toggleMask(card) {
    var button = card.querySelector("button.toggle-mask");
    var on = button.getAttribute("aria-pressed") !== "true";
    button.setAttribute("aria-pressed", String(on));
    button.textContent = (on ? "Mask shown" : "Mask hidden") + " (m)";
    Array.prototype.forEach.call(card.querySelectorAll("img.mask"), function (img) { img.hidden = !on; });
  }

  // The marker (an outline) at fractions of its picture: left, top, width, height.
  function place(marker, left, top, width, height) {
    marker.style.left = (100 * left) + "%";
    marker.style.top = (100 * top) + "%";
    marker.style.width = (100 * width) + "%";
    marker.style.height = (100 * height) + "%";
    marker.hidden = false;
  }

  // Where block `block`'s nearest normal pixel is (the card's match: review_page.match_grid): marked on the retrieved
  // image it came from when shown, the block marked on the image and map, and said in words.
  function showMatch(index, block) {
    var match = state.cards[index].match, card = cards[index];
    var which = match.cells[2 * block], cell = match.cells[2 * block + 1];
    var height = match.grid[0], width = match.grid[1], step = match.step;
    var row = Math.floor(cell / width), column = cell % width, size = match.sizes[which];
    var where = size
      ? "(" + Math.floor((column + 0.5) / width * size[0]) + ", " + Math.floor((row + 0.5) / height * size[1]) + ")"
      : "(" + Math.round((column + 0.5) / width * 100) + "%, " + Math.round((row + 0.5) / height * 100) + "%)";
    Array.prototype.forEach.call(card.querySelectorAll(".marker"), function (marker) { marker.hidden = true; });
    var figures = card.querySelectorAll("figure.neighbour"), shown = which < figures.length;
    if (shown && figures[which].querySelector("img")) {
      place(figures[which].querySelector(".marker"), column / width, row / height, 1 / width, 1 / height);
    }
    var top = Math.floor(block / match.columns) * step, left = (block % match.columns) * step;
    Array.prototype.forEach.call(card.querySelectorAll("figure.subject .marker, figure.map .marker"), function (marker) {
      if (marker.parentNode.querySelector("img")) {
        place(marker, left / width, top / height, Math.min(step, width - left) / width, Math.min(step, height - top) / height);
      }
    });
    card.querySelector("p.match").textContent = "nearest normal: " + match.ids[which] + " at " + where +
      (shown ? " (marked on nearest normal image " + (which + 1) + ")" : " (not among the images shown)") +
      (block === match.top ? ", for the most anomalous region" : ", for the pixel clicked");
  }

  // The block of the card's match under a click on its image or map.
  function blockAt(match, picture, event) {
    var box = picture.getBoundingClientRect();
    var row = Math.min(match.grid[0] - 1, Math.max(0, Math.floor((event.clientY - box.top) / box.height * match.grid[0])));
    var column = Math.min(match.grid[1] - 1, Math.max(0, Math.floor((event.clientX - box.left) / box.width * match.grid[1])));
    return Math.floor(row / match.step) * match.columns + Math.floor(column / match.step);
  }

  function sheet() {
    return state.header + "\n" + state.cards.map(function (card) {
      var verdict = verdicts[card.id];
      return card.line + (SHEET_VERDICTS[verdict] ? verdict : "") + "\n";
    }).join("");
  }

  function download() {
    var link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([sheet()], { type: "text/csv" }));
    link.download = state.sheet;
    document.body.appendChild(link);
    link.click();
    link.remove();
  }

  // RFC 4180: quoted cells may hold commas, quotes (doubled) and line breaks.
  function parseCsv(text) {
    var rows = [], row = [], cell = "", quoted = false;
    text = text.replace(/^\ufeff/, "");
    for (var i = 0; i < text.length; i += 1) {
      var ch = text[i];
      if (quoted) {
        if (ch === '"' && text[i + 1] === '"') { cell += '"'; i += 1; }
        else if (ch === '"') { quoted = false; }
        else { cell += ch; }
      } else if (ch === '"') { quoted = true; }
      else if (ch === ",") { row.push(cell); cell = ""; }
      else if (ch === "\n" || ch === "\r") {
        if (ch === "\r" && text[i + 1] === "\n") { i += 1; }
        row.push(cell); rows.push(row); row = []; cell = "";
      } else { cell += ch; }
    }
    if (cell !== "" || row.length) { row.push(cell); rows.push(row); }
    return rows;
  }

  // A sheet's id cell is the card's id as written (a leading quote before formula-like text), or as a spreadsheet
  // gave it back without that quote.
  function loadSheet(text) {
    var rows = parseCsv(text);
    var header = (rows.shift() || []).map(function (name) { return name.trim(); });
    var idColumn = header.indexOf("id"), verdictColumn = header.indexOf("verdict");
    if (idColumn < 0 || verdictColumn < 0) {
      message.textContent = "That file has no id or verdict column: load a sheet this page or `spade-batch show OUT --format csv` wrote.";
      return;
    }
    var byCell = {};
    state.cards.forEach(function (card) { byCell[card.cell] = card.id; byCell[card.id] = card.id; });
    var loaded = 0, strangers = 0, unknown = 0;
    rows.forEach(function (row) {
      if (row.every(function (cell) { return cell.trim() === ""; })) { return; }
      var id = byCell.hasOwnProperty(row[idColumn]) ? byCell[row[idColumn]] : undefined;
      var verdict = (row[verdictColumn] || "").trim().toLowerCase();
      if (id === undefined) { strangers += 1; return; }
      if (verdict === "") { return; }
      if (!SHEET_VERDICTS[verdict]) { unknown += 1; return; }
      verdicts[id] = verdict;
      loaded += 1;
    });
    save();
    refresh();
    message.textContent = "Loaded " + loaded + " verdicts." + (strangers ? " " + strangers + " rows name no image of this page." : "") +
      (unknown ? " " + unknown + " verdicts are neither normal nor defect and were left out." : "");
  }

  cards.forEach(function (card, index) {
    card.addEventListener("click", function (event) {
      var button = event.target.closest("button");
      var picture = event.target.closest("figure.subject img, figure.map img");
      current = index;
      cards.forEach(function (other) { other.classList.toggle("current", other === card); });
      if (button && button.classList.contains("mark")) { mark(index, button.dataset.verdict); }
      else if (button && button.classList.contains("toggle-mask")) { toggleMask(card); }
      else if (picture && state.cards[index].match) { showMatch(index, blockAt(state.cards[index].match, picture, event)); }
    });
  });
  filter.addEventListener("change", function () {
    refresh();
    if (cards.length && cards[current].hidden) { current = -1; move(1); }
  });
  document.getElementById("download").addEventListener("click", download);
  document.getElementById("load").addEventListener("change", function (event) {
    var file = event.target.files[0];
    if (!file) { return; }
    var reader = new FileReader();
    reader.onload = function () { loadSheet(String(reader.result)); };
    reader.readAsText(file);
  });
  document.addEventListener("keydown", function (event) {
    var tag = (event.target.tagName || "").toLowerCase();
    if (event.ctrlKey || event.metaKey || event.altKey || tag === "input" || tag === "select" || tag === "textarea" || !cards.length) {
      return;
    }
    var keys = { n: "normal", d: "defect", s: "skip" };
    if (event.key === "j" || event.key === "k") { move(event.key === "j" ? 1 : -1); }
    else if (keys[event.key]) { if (!cards[current].hidden) { mark(current, keys[event.key]); } }
    else if (event.key === "m") { toggleMask(cards[current]); }
    else { return; }
    event.preventDefault();
  });

  state.cards.forEach(function (card, index) { if (card.match) { showMatch(index, card.match.top); } });
  refresh();
  if (cards.length) {
    current = -1;
    if (!move(1)) { current = 0; }
  }
  window.spadeReview = { sheet: sheet, loadSheet: loadSheet };
}());
