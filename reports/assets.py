"""The CSS and JavaScript inlined into every report (kept here so ``html.py`` reads as structure).

Why inline: the report must open from disk, offline, years later, with no CDN or font download
(lessons from datapane#24 and sdr-visualizer). Colours are the Okabe–Ito palette, safe for the common
colour-vision deficiencies; meaning is never carried by colour alone (warnings also get an icon and a
word, sort direction an arrow, metric direction an arrow and a title).
"""

from __future__ import annotations

CSS = """
:root {
  --fg: #1b1f24; --muted: #57606a; --bg: #ffffff; --panel: #f6f8fa; --line: #d0d7de;
  --accent: #0072B2; --good: #009E73; --bad: #D55E00; --warn: #E69F00; --warn-bg: #fff5e0;
  color-scheme: light;
}
* { box-sizing: border-box; }
html { font-size: 15px; }
body {
  margin: 0; color: var(--fg); background: var(--bg); line-height: 1.5;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
}
main { max-width: 1120px; margin: 0 auto; padding: 0 1.5rem 3rem; }
header.top { background: var(--accent); color: #fff; padding: 1.1rem 1.5rem; }
header.top .inner { max-width: 1120px; margin: 0 auto; padding: 0 1.5rem; }
header.top h1 { margin: 0; font-size: 1.6rem; font-weight: 600; word-break: break-word; }
header.top p { margin: .25rem 0 0; opacity: .9; font-size: .9rem; }
h2 { font-size: 1.3rem; margin: 2.2rem 0 .6rem; padding-bottom: .3rem; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .5rem; }
a { color: var(--accent); }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace;
                   font-size: .86rem; }
pre { background: var(--panel); border: 1px solid var(--line); border-radius: 6px; padding: .7rem .9rem;
      overflow: auto; max-height: 28rem; white-space: pre-wrap; word-break: break-word; }
.muted { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: .7rem; margin: .8rem 0; }
.card { background: var(--panel); border: 1px solid var(--line); border-left: 4px solid var(--accent);
        border-radius: 6px; padding: .55rem .75rem; min-width: 0; }
.card .label { font-size: .8rem; color: var(--muted); text-transform: none; word-break: break-word; }
.card .value { font-size: 1.35rem; font-weight: 600; font-variant-numeric: tabular-nums; word-break: break-word; }
.card .value.text { font-size: 1rem; }
.card .sub { font-size: .8rem; color: var(--muted); font-variant-numeric: tabular-nums; }
.card.bad { border-left-color: var(--warn); }
.arrow { font-size: .95rem; margin-left: .3rem; color: var(--muted); }
.arrow.up { color: var(--good); }
.arrow.down { color: var(--accent); }
.alerts, .warning { background: var(--warn-bg); border: 1px solid var(--warn); border-left: 5px solid var(--warn);
                    border-radius: 6px; padding: .5rem .9rem; margin: .8rem 0; }
.alerts h3 { margin: .2rem 0 .3rem; font-size: .95rem; }
.alerts ul, .warning ul { margin: .2rem 0; padding-left: 1.2rem; }
.ok { border: 1px solid var(--line); border-left: 5px solid var(--good); border-radius: 6px;
      padding: .45rem .9rem; margin: .8rem 0; background: var(--panel); }
.icon { font-weight: 700; margin-right: .25rem; }
nav.toc ol { columns: 2; column-gap: 2rem; padding-left: 1.4rem; margin: .4rem 0; }
nav.toc li { break-inside: avoid; margin: .1rem 0; }
.badge { display: inline-block; font-size: .72rem; padding: 0 .4rem; border-radius: 9px; margin-left: .35rem;
         background: var(--warn-bg); border: 1px solid var(--warn); color: #6b4700; vertical-align: middle; }
section.result { margin-top: 1.5rem; }
section.result > h2 .name { font-size: .8rem; font-weight: 400; color: var(--muted); margin-left: .5rem; }
.summary p { margin: .35rem 0; }
figure { margin: 1rem 0; padding: .6rem; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: .88rem; color: var(--muted); margin-top: .4rem; }
figcaption b { color: var(--fg); }
.tablewrap { overflow: auto; max-height: 34rem; width: fit-content; max-width: 100%;
             border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; min-width: 22rem; font-size: .86rem; font-variant-numeric: tabular-nums; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; white-space: nowrap; }
thead th { position: sticky; top: 0; background: var(--panel); border-bottom: 1px solid var(--line); z-index: 1; }
th button { all: unset; cursor: pointer; font-weight: 600; white-space: nowrap; }
th button:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
th .dir { color: var(--muted); font-size: .75rem; margin-left: .2rem; }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody tr:hover { background: #eef6fc; }
.table { margin: 1.3rem 0; }
.tablecap { font-size: .88rem; color: var(--muted); margin: .3rem 0 .6rem; }
.truncated { font-size: .85rem; margin: .3rem 0; }
details { margin: .8rem 0; border: 1px solid var(--line); border-radius: 6px; padding: .3rem .8rem;
          background: var(--panel); }
details summary { cursor: pointer; font-size: .9rem; color: var(--muted); }
table.kv { width: 100%; }
table.kv td:first-child { color: var(--muted); width: 14rem; word-break: break-word; }
table.kv td { word-break: break-word; }
ul.notes { padding-left: 1.2rem; }
footer { max-width: 1120px; margin: 2rem auto; padding: 0 1.5rem; font-size: .8rem; color: var(--muted); }
@media (max-width: 700px) { nav.toc ol { columns: 1; } }
@media print { .tablewrap { max-height: none; overflow: visible; } details { display: block; } }
"""

# Runs first (in <head>): counts uncaught errors and console.error calls on <html data-js-errors>,
# so a headless browser's --dump-dom shows whether the page's own script failed.
ERROR_JS = """(function(){var d=document.documentElement,n=0,msgs=[];
function rec(m){n+=1;msgs.push(String(m));d.setAttribute('data-js-errors',String(n));
d.setAttribute('data-js-error-messages',msgs.join(' | '));}
d.setAttribute('data-js-errors','0');
window.addEventListener('error',function(e){rec(e.message||'error');});
window.addEventListener('unhandledrejection',function(e){rec('unhandled rejection: '+e.reason);});
var ce=console.error;
console.error=function(){rec(Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};
})();"""

# Runs last (end of <body>): click a column header to sort its table; numbers sort numerically (from
# each cell's data-v, the unrounded value), text lexicographically; empty cells always go last.
SORT_JS = """(function(){
function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim():v;}
function sortTable(table,col,th){
  var tb=table.tBodies[0],rows=Array.prototype.slice.call(tb.rows);
  var dir=th.getAttribute('aria-sort')==='ascending'?-1:1;
  var num=rows.every(function(r){var k=key(r.cells[col]);return k===''||isFinite(Number(k));});
  rows.sort(function(a,b){
    var x=key(a.cells[col]),y=key(b.cells[col]);
    if(x===''||y===''){return (x==='')-(y==='');}
    var c=num?Number(x)-Number(y):x.localeCompare(y,undefined,{numeric:true});
    return dir*c;});
  rows.forEach(function(r){tb.appendChild(r);});
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){
    h.removeAttribute('aria-sort');var s=h.querySelector('.dir');if(s){s.textContent='';}});
  th.setAttribute('aria-sort',dir===1?'ascending':'descending');
  th.querySelector('.dir').textContent=dir===1?'\\u25B2':'\\u25BC';
}
Array.prototype.forEach.call(document.querySelectorAll('table.sortable'),function(table){
  Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,col){
    var b=th.querySelector('button');if(b){b.addEventListener('click',function(){sortTable(table,col,th);});}
  });
});
document.documentElement.setAttribute('data-js-ready','1');
})();"""
