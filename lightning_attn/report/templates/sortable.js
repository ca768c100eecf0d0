(function () {
  function key(cell) {
    var raw = cell.getAttribute('data-v');
    if (raw === null) raw = cell.textContent;
    var text = raw.trim();
    var num = Number(text);
    if (text !== '' && isFinite(num)) return {n: true, v: num};
    return {n: false, v: text.toLowerCase()};
  }
  function sortTable(table, col, ascending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      var r;
      if (x.n && y.n) r = x.v - y.v;
      else if (x.n !== y.n) r = x.n ? -1 : 1;
      else r = x.v < y.v ? -1 : (x.v > y.v ? 1 : 0);
      return ascending ? r : -r;
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (row) { fragment.appendChild(row); });
    body.appendChild(fragment);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
      if (i === col) th.setAttribute('data-sort', ascending ? 'asc' : 'desc'); else th.removeAttribute('data-sort');
    });
  }
  function makeSortable(table) {
    if (!table.tHead || !table.tBodies.length) return;
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener('click', function () {
        sortTable(table, col, th.getAttribute('data-sort') !== 'asc');
      });
    });
  }
  document.addEventListener('DOMContentLoaded', function () {
    Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), makeSortable);
  });
  window.addEventListener('load', function () {
    var checks = document.getElementById('checks');
    var images = document.images, loaded = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) loaded++;
    }
    var table = document.getElementById('samples');
    var rows = table && table.tBodies.length ? table.tBodies[0].rows.length : 0;
    var expected = Number(checks.getAttribute('data-expected-rows'));
    checks.setAttribute('data-images', String(images.length));
    checks.setAttribute('data-images-loaded', String(loaded));
    checks.setAttribute('data-rows', String(rows));
    var ok = loaded === images.length && rows === expected;
    if (table && window.location.hash === '#selftest') {
      var header = table.tHead.rows[0].cells, col = -1;
      for (var c = 0; c < header.length; c++) { if (header[c].textContent === 'confidence') col = c; }
      var sorted = col >= 0;
      if (sorted) {
        sortTable(table, col, true);
        var body = table.tBodies[0].rows;
        for (var r = 1; r < body.length; r++) {
          if (Number(body[r - 1].cells[col].textContent) > Number(body[r].cells[col].textContent)) { sorted = false;
          break; }
        }
      }
      checks.setAttribute('data-sort', sorted ? 'ok' : 'fail');
      ok = ok && sorted;
    }
    checks.setAttribute('data-status', ok ? 'ok' : 'fail');
    checks.textContent = 'self-check: ' + loaded + '/' + images.length + ' images loaded, ' + rows + '/' + expected +
      ' per-sample rows' + (ok ? ' (ok)' : ' (FAILED)');
  });
})();
