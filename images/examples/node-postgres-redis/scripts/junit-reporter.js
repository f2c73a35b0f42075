'use strict';
// JUnit XML reporter for `node --test` (Node 18 has none built in): one <testcase> per leaf test.

const path = require('node:path');

function escapeXml(text) {
  return String(text)
    .replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f]/g, '')
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;');
}

function describeError(error) {
  // The runner wraps the test's own error; the cause is what the test author threw.
  const cause = error && error.cause ? error.cause : error;
  if (!cause) {
    return { message: 'failed', detail: '' };
  }
  const message = cause.message || String(cause);
  // An attribute holds one line; the whole message stays in the element's text.
  return { message: message.split('\n')[0], detail: cause.stack || String(cause) };
}

module.exports = async function* junitReporter(source) {
  const cases = [];
  // Per file, the names of the tests that are running, by nesting level, and whether each one has
  // subtests (then it is a suite, not a case).
  const running = new Map();

  for await (const event of source) {
    const data = event.data;
    const file = data.file ? path.relative(process.cwd(), data.file) : '';
    if (event.type === 'test:start') {
      const stack = running.get(file) || [];
      stack.length = data.nesting;
      if (data.nesting > 0 && stack[data.nesting - 1]) {
        stack[data.nesting - 1].hasChildren = true;
      }
      stack[data.nesting] = { name: data.name, hasChildren: false };
      running.set(file, stack);
    } else if (event.type === 'test:pass' || event.type === 'test:fail') {
      const stack = running.get(file) || [];
      const own = stack[data.nesting];
      if (own && own.hasChildren) {
        continue;
      }
      const parents = stack.slice(0, data.nesting).map((entry) => entry.name);
      cases.push({
        classname: [file, ...parents].filter(Boolean).join(' > '),
        name: data.name,
        seconds: ((data.details && data.details.duration_ms) || 0) / 1000,
        skipped: Boolean(data.skip || data.todo),
        failure: event.type === 'test:fail' ? describeError(data.details.error) : null,
      });
    }
  }

  const failures = cases.filter((entry) => entry.failure).length;
  const skipped = cases.filter((entry) => entry.skipped).length;
  const seconds = cases.reduce((total, entry) => total + entry.seconds, 0);
  const counts = `tests="${cases.length}" failures="${failures}" errors="0" skipped="${skipped}"`;
  yield '<?xml version="1.0" encoding="UTF-8"?>\n';
  yield `<testsuites ${counts} time="${seconds.toFixed(3)}">\n`;
  yield `  <testsuite name="node --test" ${counts} time="${seconds.toFixed(3)}">\n`;
  for (const entry of cases) {
    const attributes = `classname="${escapeXml(entry.classname)}" name="${escapeXml(entry.name)}"`;
    yield `    <testcase ${attributes} time="${entry.seconds.toFixed(3)}">\n`;
    if (entry.failure) {
      yield `      <failure message="${escapeXml(entry.failure.message)}">`;
      yield `${escapeXml(entry.failure.detail)}</failure>\n`;
    } else if (entry.skipped) {
      yield '      <skipped/>\n';
    }
    yield '    </testcase>\n';
  }
  yield '  </testsuite>\n</testsuites>\n';
};
