/* The report's per-sample table filters (only wrong, by true class, by confidence range) and the drill-down of a
   clicked row: the row's values and, for probe samples, the input drawn as what it is (an image, tokens, a line
   chart), its saliency and its attention maps (read through window.lightningAttn). */
(function () {
  'use strict';
  var $ = function (id) { return document.getElementById(id); };
  var node = $('la-probes');
  var probes = node ? JSON.parse(node.textContent) : {};
  var table = $('samples');
  if (!table) return;
  var SVG = 'http://www.w3.org/2000/svg';
  var LINE_COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f'];

  function filter() {
    var wrong = $('f-wrong').checked, klass = $('f-class').value;
    var low = $('f-cmin').value === '' ? -Infinity : Number($('f-cmin').value);
    var high = $('f-cmax').value === '' ? Infinity : Number($('f-cmax').value);
    var shown = 0;
    Array.prototype.forEach.call(table.tBodies[0].rows, function (row) {
      var confidence = Number(row.getAttribute('data-confidence'));
      var keep = (!wrong || row.getAttribute('data-correct') === '0') &&
        (klass === '' || row.getAttribute('data-target') === klass) && confidence >= low && confidence <= high;
      row.style.display = keep ? '' : 'none';
      if (keep) shown++;
    });
    $('f-count').textContent = shown + ' of ' + table.tBodies[0].rows.length + ' rows shown';
  }
  ['f-wrong', 'f-class', 'f-cmin', 'f-cmax'].forEach(function (id) {
    $(id).addEventListener('input', filter);
    $(id).addEventListener('change', filter);
  });

  function el(tag, text, className) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (className) e.className = className;
    return e;
  }

  function imageView(input) {
    var canvas = el('canvas'), size = input.height * input.width;
    canvas.width = input.width; canvas.height = input.height;
    var ctx = canvas.getContext('2d'), image = ctx.createImageData(input.width, input.height);
    for (var p = 0; p < size; p++) {
      for (var c = 0; c < 3; c++) {
        var v = input.values[(input.channels === 3 ? c : 0) * size + p];
        image.data[4 * p + c] = Math.round(255 * v);
      }
      image.data[4 * p + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    canvas.style.width = Math.max(160, input.width) + 'px';
    canvas.setAttribute('data-kind', 'image');
    return canvas;
  }

  function seriesView(input) {
    var width = 420, height = 160, svg = document.createElementNS(SVG, 'svg');
    svg.setAttribute('width', width); svg.setAttribute('height', height + 20);
    svg.setAttribute('data-kind', 'series');
    var all = [].concat.apply([], input.values), low = Math.min.apply(null, all), high = Math.max.apply(null, all);
    var span = high - low || 1, n = input.length;
    input.values.forEach(function (line, f) {
      var path = document.createElementNS(SVG, 'polyline');
      path.setAttribute('points', line.map(function (v, i) {
        return (n > 1 ? i * (width - 10) / (n - 1) + 5 : width / 2).toFixed(1) + ',' +
          (5 + (high - v) * (height - 10) / span).toFixed(1);
      }).join(' '));
      path.setAttribute('fill', 'none');
      path.setAttribute('stroke', LINE_COLORS[f % LINE_COLORS.length]);
      var title = document.createElementNS(SVG, 'title');
      title.textContent = input.features[f];
      path.appendChild(title);
      svg.appendChild(path);
    });
    var legend = document.createElementNS(SVG, 'text');
    legend.setAttribute('x', 5); legend.setAttribute('y', height + 15); legend.setAttribute('font-size', '11');
    legend.textContent = input.length + ' positions; lines: ' + input.features.join(', ') + '; range ' +
      low.toPrecision(3) + ' to ' + high.toPrecision(3);
    svg.appendChild(legend);
    return svg;
  }

  function tokenView(tokens) {
    var box = el('div'), peak = Math.max.apply(null, tokens.share.concat([0]));
    box.setAttribute('data-kind', 'tokens');
    tokens.tokens.forEach(function (token, i) {
      var span = el('span', token, 'dtok'), strength = peak > 0 ? tokens.share[i] / peak : 0;
      var rgb = tokens.attribution[i] >= 0 ? '214,39,40' : '31,119,180';
      span.style.background = 'rgba(' + rgb + ',' + strength.toFixed(3) + ')';
      span.title = 'share ' + tokens.share[i].toFixed(3);
      box.appendChild(span);
    });
    return box;
  }

  function saliencyView(probe) {
    var box = el('div');
    Object.keys(probe.saliency).forEach(function (name) {
      box.appendChild(el('h4', 'Saliency of input ' + name + ' (share of |gradient x input|)'));
      var list = el('table');
      probe.saliency[name].forEach(function (pair) {
        var row = list.insertRow(), bar = el('span', null, 'bar');
        bar.style.width = Math.round(160 * pair[1]) + 'px';
        row.insertCell().textContent = pair[0];
        row.insertCell().appendChild(bar);
        row.insertCell().textContent = pair[1].toFixed(3);
      });
      box.appendChild(list);
    });
    return box;
  }

  function mapsView(sample) {
    var box = el('div', null, 'row');
    var api = window.lightningAttn;
    if (!api) return box;
    api.ready.then(function () {
      api.sites.forEach(function (site, layer) {
        var rows = api.map(layer, 'mean', sample);
        if (!rows) return;
        var figure = el('figure'), canvas = el('canvas');
        api.paint(canvas, rows, 120);
        canvas.setAttribute('data-kind', 'attention');
        canvas.addEventListener('click', function () {
          api.select({layer: layer, head: 0, sample: sample});
          $('explorer').scrollIntoView();
        });
        figure.appendChild(canvas);
        figure.appendChild(el('figcaption', site + ' (mean over heads; click: explorer)'));
        box.appendChild(figure);
      });
    });
    return box;
  }

  function drill(row) {
    var panel = $('drilldown'), header = table.tHead.rows[0].cells, sample = row.getAttribute('data-sample');
    Array.prototype.forEach.call(table.querySelectorAll('tr.selected'), function (r) { r.classList.remove('selected'); });
    row.classList.add('selected');
    panel.textContent = '';
    panel.setAttribute('data-sample', sample);
    var probe = probes[sample];
    panel.appendChild(el('h3', 'Sample ' + sample + (row.getAttribute('data-correct') === '0' ? ' (wrong)' : '')));
    var facts = el('table');
    ['target', 'target_name', 'predicted', 'predicted_name', 'confidence', 'margin', 'nll', 'correct']
      .forEach(function (name) {
        for (var c = 0; c < header.length; c++) {
          if (header[c].textContent !== name) continue;
          var r = facts.insertRow();
          r.insertCell().textContent = name;
          r.insertCell().textContent = row.cells[c].textContent;
        }
      });
    var top = el('div', null, 'row');
    top.appendChild(facts);
    panel.appendChild(top);
    if (!probe) {
      panel.appendChild(el('p', 'Not a probe sample: the report keeps inputs, saliency and attention maps only for ' +
        'its probe samples (probe_samples / probe_indices): ' + Object.keys(probes).join(', ') + '.', 'note'));
      return;
    }
    probe.inputs.forEach(function (input) {
      var figure = el('figure');
      figure.appendChild(input.kind === 'image' ? imageView(input) : seriesView(input));
      figure.appendChild(el('figcaption', 'input ' + input.name + ' ' + JSON.stringify(input.shape) +
        (input.note ? ' (' + input.note + ')' : '')));
      top.appendChild(figure);
      var map = probe.positions[input.name];
      if (map && window.lightningAttn) {
        var beside = el('figure'), canvas = el('canvas');
        window.lightningAttn.paint(canvas, map, 160);
        canvas.setAttribute('data-kind', 'saliency');
        beside.appendChild(canvas);
        beside.appendChild(el('figcaption', '|gradient x input| of ' + input.name + ': positions (rows) x features ' +
          '(columns), darker: more'));
        top.appendChild(beside);
      }
    });
    if (probe.tokens) {
      panel.appendChild(el('h4', 'Tokens, shaded by saliency (red: for, blue: against class ' +
        probe.explained_class + ')'));
      panel.appendChild(tokenView(probe.tokens));
    }
    panel.appendChild(saliencyView(probe));
    panel.appendChild(el('h4', 'Attention maps'));
    panel.appendChild(mapsView(Number(sample)));
  }

  table.tBodies[0].addEventListener('click', function (event) {
    var row = event.target.closest('tr');
    if (row) drill(row);
  });
  filter();
})();
