// Small SVG charts for the dashboard: a line chart and a stacked bar chart, no library needed.
// Every label is inserted as a text node, never as markup.
"use strict";

window.RouteCharts = (function () {
  const NS = "http://www.w3.org/2000/svg";
  const WIDTH = 480;
  const HEIGHT = 220;
  const PAD = { left: 48, right: 8, top: 10, bottom: 26 };

  function svg(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value !== null && value !== undefined) node.setAttribute(key, String(value));
    }
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function frame(labels, yMax, yFormat) {
    const root = svg("svg", {
      viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
      class: "chart-svg",
      role: "img",
    });
    const plotW = WIDTH - PAD.left - PAD.right;
    const plotH = HEIGHT - PAD.top - PAD.bottom;
    const x = (i) => PAD.left + (labels.length <= 1 ? plotW / 2 : (i * plotW) / (labels.length - 1));
    const y = (v) => PAD.top + plotH - (yMax > 0 ? (v / yMax) * plotH : 0);
    for (let k = 0; k <= 4; k++) {
      const value = (yMax * k) / 4;
      root.append(svg("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), class: "grid" }));
      root.append(svg("text", { x: PAD.left - 6, y: y(value) + 4, class: "tick", "text-anchor": "end" }, yFormat(value)));
    }
    const every = Math.max(1, Math.ceil(labels.length / 6));
    labels.forEach((label, i) => {
      const last = i === labels.length - 1;
      if ((i % every === 0 && labels.length - 1 - i >= every / 2) || last) {
        const anchor = last ? "end" : i === 0 ? "start" : "middle";
        root.append(svg("text", { x: x(i), y: HEIGHT - 8, class: "tick", "text-anchor": anchor }, label));
      }
    });
    return { root, x, y, plotW, plotH };
  }

  function legend(container, entries) {
    const box = document.createElement("div");
    box.className = "legend";
    for (const entry of entries) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.className = `swatch ${entry.cls}${entry.dashed ? " dashed" : ""}`;
      item.append(swatch, document.createTextNode(entry.name));
      box.append(item);
    }
    container.append(box);
  }

  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (step * power >= value) return step * power;
    }
    return 10 * power;
  }

  // series: [{name, values (numbers or null for gaps), cls, dashed}]
  function line(container, { labels, series, yMax, yFormat }) {
    const top = yMax !== undefined ? yMax : niceMax(Math.max(0, ...series.flatMap((s) => s.values.filter((v) => v !== null))));
    const { root, x, y } = frame(labels, top, yFormat || ((v) => String(v)));
    for (const s of series) {
      let path = "";
      let pen = false;
      s.values.forEach((value, i) => {
        if (value === null || value === undefined) {
          pen = false;
          return;
        }
        path += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(Math.min(value, top)).toFixed(1)} `;
        pen = true;
        // A dot where a line cannot show the value: an isolated point, and the latest one.
        const missing = (j) => j < 0 || j >= s.values.length || s.values[j] === null || s.values[j] === undefined;
        if (!s.dashed && ((missing(i - 1) && missing(i + 1)) || i === s.values.length - 1)) {
          const dot = svg("circle", { cx: x(i), cy: y(Math.min(value, top)), r: 2.5, class: `dot ${s.cls}` });
          dot.append(svg("title", {}, `${labels[i]} ${s.name}: ${(yFormat || String)(value)}`));
          root.append(dot);
        }
      });
      if (path) root.append(svg("path", { d: path.trim(), class: `series ${s.cls}${s.dashed ? " dashed" : ""}` }));
    }
    container.replaceChildren(root);
    legend(container, series);
  }

  // stacks: [{name, values, cls}] drawn bottom-up in order; counts get whole-number ticks
  function bars(container, { labels, stacks, yFormat }) {
    const totals = labels.map((_, i) => stacks.reduce((sum, s) => sum + (s.values[i] || 0), 0));
    const top = Math.max(4, Math.ceil(niceMax(Math.max(0, ...totals)) / 4) * 4);
    const { root, x, y, plotW } = frame(labels, top, yFormat || ((v) => String(v)));
    const barW = Math.max(1, (plotW / Math.max(1, labels.length)) * 0.7);
    labels.forEach((label, i) => {
      let base = 0;
      for (const s of stacks) {
        const value = s.values[i] || 0;
        if (value > 0) {
          const rect = svg("rect", {
            x: x(i) - barW / 2,
            y: y(base + value),
            width: barW,
            height: Math.max(0.5, y(base) - y(base + value)),
            class: `bar ${s.cls}`,
          });
          rect.append(svg("title", {}, `${label} ${s.name}: ${value}`));
          root.append(rect);
        }
        base += value;
      }
    });
    container.replaceChildren(root);
    legend(container, stacks);
  }

  return { line, bars };
})();
