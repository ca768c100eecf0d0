/* The attention explorer: a head view (queries left, keys right, one line per (query, key) weighted by attention,
   as bertviz draws it) and a model view (a layers x heads grid of small maps; click one to enlarge) over the maps of
   the probe samples that the page carries inline (zlib-deflated, base64; decoded with the browser's own
   DecompressionStream: no network). Above 128 keys the head view draws the top 8 lines of each query; the model
   view block-averages every map down to its cell.

   window.lightningAttn drives it and reads back what is drawn:
     ready                          a Promise, resolved once the maps are decoded and drawn
     sites, samples, epochs         site names (layer = index), probe sample indices, epochs
     select({layer, head | heads, sample, epoch})   layer: index or site name; sample: its sample index
     state()                        {layer, site, heads, sample, epoch, hover}
     weights(head?)                 the selected map [queries][keys] (default: the first selected head)
     map(layer, head | 'mean', sample, epoch?)       any map
     drawnLines()                   the head view's lines now: {head, query, key, weight} each
     hover(side, index)             as a mouse over token `index` of side 'q' or 'k' (null: none) */
(function () {
  'use strict';
  var node = document.getElementById('la-explorer-data');
  var root = document.getElementById('la-explorer');
  if (!node || !root) return;
  var spec = JSON.parse(node.textContent);
  var COLORS = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22',
    '#17becf', '#393b79', '#ad494a', '#637939', '#843c39', '#7b4173', '#3182bd'];
  var DENSE_MAX = 128;  // above this many keys only the top-k lines of each query are drawn
  var TOP_K = 8;
  var THUMB = 48;       // model-view cell size (px); larger maps are block-averaged down to it
  var BIG = 320;
  var scale = spec.encoding === 'uint8' ? 1 / spec.levels : 1;
  var values = null;
  var chunks = {};
  spec.chunks.forEach(function (c) { chunks[c.e + '|' + c.s + '|' + c.l] = c; });
  var state = {layer: 0, heads: [0], sample: 0, epoch: spec.epochs.length - 1, hover: null};
  var drawn = [];
  var $ = function (id) { return document.getElementById(id); };

  function decode() {
    var text = atob(spec.data);
    var bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('deflate'));
    return new Response(stream).arrayBuffer().then(function (buffer) {
      values = spec.encoding === 'float32' ? new Float32Array(buffer) : new Uint8Array(buffer);
    });
  }

  function chunk(layer, sample, epoch) { return chunks[epoch + '|' + sample + '|' + layer] || null; }

  function matrix(c, head) {
    var rows = [];
    for (var q = 0; q < c.q; q++) {
      var row = new Array(c.k), base = c.o + (head * c.q + q) * c.k;
      for (var k = 0; k < c.k; k++) row[k] = values[base + k] * scale;
      rows.push(row);
    }
    return rows;
  }

  function labels(c, side) {
    var tokens = spec.samples[state.sample].tokens, n = side === 'q' ? c.q : c.k;
    if (tokens && (tokens.length === n || (c.q === c.k && tokens.length < n))) {  // padding: named by position
      return tokens.concat(Array.from({length: n - tokens.length}, function (_, i) { return '#' + (tokens.length + i); }));
    }
    var names = spec.sites[c.l][side === 'q' ? 'query_labels' : 'key_labels'];
    if (names && names.length === n) return names;
    var out = [];
    for (var i = 0; i < n; i++) out.push(String(i));
    return out;
  }

  function colour(head) { return COLORS[head % COLORS.length]; }

  function topKeys(row) {
    if (row.length <= DENSE_MAX) return row.map(function (_, k) { return k; });
    return row.map(function (w, k) { return [w, k]; }).sort(function (a, b) { return b[0] - a[0]; })
      .slice(0, TOP_K).map(function (p) { return p[1]; });
  }

  function column(el, names, side, height) {
    el.textContent = '';
    var font = Math.min(12, height - 1);
    names.forEach(function (name, i) {
      var div = document.createElement('div');
      div.textContent = font >= 7 ? name : '';  // too small to read: the name is in the tooltip
      div.title = i + ': ' + name;
      div.style.height = div.style.lineHeight = height + 'px';
      div.style.fontSize = font + 'px';
      div.setAttribute('data-index', String(i));
      div.addEventListener('mouseenter', function () { state.hover = {side: side, index: i}; drawHeadView(); });
      div.addEventListener('mouseleave', function () { state.hover = null; drawHeadView(); });
      el.appendChild(div);
    });
  }

  function drawHeadView() {
    var c = chunk(state.layer, state.sample, state.epoch), canvas = $('la-lines');
    drawn = [];
    var message = $('la-message');
    if (!c) {
      message.textContent = 'No map of this site for this sample and epoch.';
      canvas.width = 1; canvas.height = 1;
      return;
    }
    message.textContent = c.k > DENSE_MAX ? c.k + ' keys: the top ' + TOP_K + ' lines of each query are drawn.' : '';
    var n = Math.max(c.q, c.k), height = n <= 48 ? 16 : n <= 128 ? 10 : Math.max(3, Math.floor(1280 / n));
    var left = $('la-left'), right = $('la-right');
    if (left.getAttribute('data-key') !== [c.l, c.q, c.k, state.sample, height].join(',')) {
      column(left, labels(c, 'q'), 'q', height);
      column(right, labels(c, 'k'), 'k', height);
      left.setAttribute('data-key', [c.l, c.q, c.k, state.sample, height].join(','));
    }
    var hover = state.hover;
    Array.prototype.forEach.call(left.children, function (d, i) {
      d.classList.toggle('active', !!hover && hover.side === 'q' && hover.index === i);
    });
    Array.prototype.forEach.call(right.children, function (d, i) {
      d.classList.toggle('active', !!hover && hover.side === 'k' && hover.index === i);
    });
    canvas.width = 240;
    canvas.height = n * height;
    var ctx = canvas.getContext('2d');
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    ctx.lineWidth = 1.5;
    state.heads.forEach(function (head) {
      if (head >= c.h) return;
      var rows = matrix(c, head);
      ctx.strokeStyle = colour(head);
      for (var q = 0; q < c.q; q++) {
        if (hover && hover.side === 'q' && hover.index !== q) continue;
        var keys = hover && hover.side === 'k' ? [hover.index] : topKeys(rows[q]);
        keys.forEach(function (k) {
          var w = rows[q][k];
          drawn.push({head: head, query: q, key: k, weight: w});
          if (w <= 0) return;
          ctx.globalAlpha = Math.min(1, w);  // opacity = attention weight, as bertviz draws it
          ctx.beginPath();
          ctx.moveTo(0, (q + 0.5) * height);
          ctx.lineTo(canvas.width, (k + 0.5) * height);
          ctx.stroke();
        });
      }
    });
    ctx.globalAlpha = 1;
    root.setAttribute('data-drawn', String(drawn.length));
  }

  function paint(canvas, rows, size) {
    var q = rows.length, k = rows[0].length, h = Math.min(q, size), w = Math.min(k, size);
    var sums = new Float64Array(h * w), counts = new Float64Array(h * w), peak = 0;
    for (var i = 0; i < q; i++) {
      var y = Math.floor(i * h / q);
      for (var j = 0; j < k; j++) {
        var x = Math.floor(j * w / k);
        sums[y * w + x] += rows[i][j];
        counts[y * w + x] += 1;
      }
    }
    for (var p = 0; p < sums.length; p++) { sums[p] /= counts[p]; peak = Math.max(peak, sums[p]); }
    canvas.width = w; canvas.height = h;
    var ctx = canvas.getContext('2d'), image = ctx.createImageData(w, h);
    for (var m = 0; m < sums.length; m++) {
      var v = peak > 0 ? sums[m] / peak : 0;
      image.data[4 * m] = Math.round(255 - 222 * v);
      image.data[4 * m + 1] = Math.round(255 - 167 * v);
      image.data[4 * m + 2] = Math.round(255 - 87 * v);
      image.data[4 * m + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
    var aspect = q / k;
    canvas.style.width = (aspect <= 1 ? size : Math.round(size / aspect)) + 'px';
    canvas.style.height = (aspect <= 1 ? Math.round(size * aspect) : size) + 'px';
  }

  function mean(c) {
    var total = matrix(c, 0);
    for (var head = 1; head < c.h; head++) {
      var rows = matrix(c, head);
      for (var q = 0; q < c.q; q++) for (var k = 0; k < c.k; k++) total[q][k] += rows[q][k];
    }
    return total.map(function (row) { return row.map(function (v) { return v / c.h; }); });
  }

  function drawModelView() {
    var grid = $('la-grid'), heads = Math.max.apply(null, spec.sites.map(function (s) { return s.heads; }));
    grid.textContent = '';
    grid.style.gridTemplateColumns = 'auto repeat(' + heads + ', ' + THUMB + 'px)';
    grid.appendChild(document.createElement('span'));
    for (var h = 0; h < heads; h++) {
      var th = document.createElement('span');
      th.textContent = 'h' + h;
      grid.appendChild(th);
    }
    spec.sites.forEach(function (site, layer) {
      var name = document.createElement('span');
      name.textContent = layer + ': ' + site.name;
      grid.appendChild(name);
      var c = chunk(layer, state.sample, state.epoch);
      for (var head = 0; head < heads; head++) {
        var cell = document.createElement('canvas');
        if (c && head < c.h) {
          paint(cell, matrix(c, head), THUMB);
          cell.title = site.name + ' head ' + head;
          cell.setAttribute('data-layer', String(layer));
          cell.setAttribute('data-head', String(head));
          if (layer === state.layer && state.heads[0] === head) cell.className = 'current';
          cell.addEventListener('click', (function (l, hh) {
            return function () { api.select({layer: l, head: hh}); };
          })(layer, head));
        } else {
          cell.width = cell.height = 1;
          cell.style.visibility = 'hidden';
        }
        grid.appendChild(cell);
      }
    });
    var c = chunk(state.layer, state.sample, state.epoch), big = $('la-big');
    if (c && state.heads[0] < c.h) {
      paint(big, matrix(c, state.heads[0]), BIG);
      $('la-big-title').textContent = spec.sites[state.layer].name + ', head ' + state.heads[0] + ' (' + c.q +
        ' queries x ' + c.k + ' keys; rows: queries; darker: more attention)';
    }
  }

  function syncControls() {
    $('la-sample').value = String(state.sample);
    $('la-layer').value = String(state.layer);
    var boxes = $('la-heads');
    boxes.textContent = '';
    for (var h = 0; h < spec.sites[state.layer].heads; h++) {
      var label = document.createElement('label'), box = document.createElement('input');
      box.type = 'checkbox';
      box.checked = state.heads.indexOf(h) >= 0;
      box.setAttribute('data-head', String(h));
      box.addEventListener('change', function () {
        var chosen = [];
        Array.prototype.forEach.call(boxes.querySelectorAll('input'), function (b) {
          if (b.checked) chosen.push(Number(b.getAttribute('data-head')));
        });
        state.heads = chosen.length ? chosen : [0];
        render();
      });
      label.style.color = colour(h);
      label.appendChild(box);
      label.appendChild(document.createTextNode('h' + h));
      boxes.appendChild(label);
    }
    var slider = $('la-epoch');
    slider.value = String(state.epoch);
    $('la-epoch-label').textContent = 'epoch ' + spec.epochs[state.epoch];
  }

  function render() {
    syncControls();
    drawHeadView();
    drawModelView();
  }

  function sampleIndex(id) {
    for (var i = 0; i < spec.samples.length; i++) if (spec.samples[i].id === Number(id)) return i;
    throw new Error('lightningAttn: no probe sample ' + id + ' (have ' + spec.samples.map(function (s) {
      return s.id; }).join(', ') + ')');
  }

  var api = {
    sites: spec.sites.map(function (s) { return s.name; }),
    samples: spec.samples.map(function (s) { return s.id; }),
    epochs: spec.epochs.slice(),
    encoding: spec.encoding,
    /** Select a layer (index or site name), a head or heads, a probe sample (its sample index) and an epoch. */
    select: function (choice) {
      choice = choice || {};
      if (choice.layer !== undefined) {
        var layer = typeof choice.layer === 'string' ? api.sites.indexOf(choice.layer) : Number(choice.layer);
        if (layer < 0 || layer >= spec.sites.length) throw new Error('lightningAttn: no layer ' + choice.layer);
        state.layer = layer;
      }
      if (choice.heads !== undefined) state.heads = choice.heads.map(Number);
      if (choice.head !== undefined) state.heads = [Number(choice.head)];
      if (choice.sample !== undefined) state.sample = sampleIndex(choice.sample);
      if (choice.epoch !== undefined) {
        var epoch = spec.epochs.indexOf(Number(choice.epoch));
        if (epoch < 0) throw new Error('lightningAttn: no epoch ' + choice.epoch);
        state.epoch = epoch;
      }
      state.hover = null;
      render();
      return api.state();
    },
    state: function () {
      return {layer: state.layer, site: api.sites[state.layer], heads: state.heads.slice(),
        sample: spec.samples[state.sample].id, epoch: spec.epochs[state.epoch], hover: state.hover};
    },
    /** The selected layer's map of ``head`` (default: the first selected head), [queries][keys], as drawn. */
    weights: function (head) {
      var c = chunk(state.layer, state.sample, state.epoch);
      return c ? matrix(c, head === undefined ? state.heads[0] : head) : null;
    },
    /** Any map: layer (index), head (index or 'mean'), sample (sample index), epoch (value; default the last). */
    map: function (layer, head, sample, epoch) {
      var e = epoch === undefined ? spec.epochs.length - 1 : spec.epochs.indexOf(Number(epoch));
      var c = chunk(layer, sampleIndex(sample), e);
      if (!c) return null;
      if (head === 'mean') return mean(c);
      var heads = spec.sites[layer].heads;  // an index past the layer's heads would read the next layer's rows
      if (!(Number.isInteger(head) && head >= 0 && head < heads)) {
        throw new RangeError('head ' + head + ' out of range: layer ' + layer + ' has ' + heads + ' heads');
      }
      return matrix(c, head);
    },
    /** The lines of the head view now: {head, query, key, weight} each. */
    drawnLines: function () { return drawn.slice(); },
    hover: function (side, index) { state.hover = side ? {side: side, index: index} : null; drawHeadView(); },
    paint: paint,
  };
  window.lightningAttn = api;

  spec.samples.forEach(function (s, i) {
    var option = document.createElement('option');
    option.value = String(i);
    option.textContent = s.title;
    $('la-sample').appendChild(option);
  });
  spec.sites.forEach(function (s, i) {
    var option = document.createElement('option');
    option.value = String(i);
    option.textContent = i + ': ' + s.name + ' (' + s.heads + ' heads)';
    $('la-layer').appendChild(option);
  });
  var slider = $('la-epoch');
  slider.max = String(spec.epochs.length - 1);
  if (spec.epochs.length < 2) slider.parentNode.style.display = 'none';
  $('la-sample').addEventListener('change', function (e) { state.sample = Number(e.target.value); render(); });
  $('la-layer').addEventListener('change', function (e) {
    state.layer = Number(e.target.value);
    state.heads = [0];
    render();
  });
  slider.addEventListener('input', function (e) { state.epoch = Number(e.target.value); render(); });
  api.ready = decode().then(function () {
    render();
    root.setAttribute('data-ready', 'true');
    return api;
  });
})();
