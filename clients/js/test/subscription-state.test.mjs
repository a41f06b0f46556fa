// A Subscription's state lives in the Subscription: RealtimeClient changes
// it only by calling the Subscription's methods (`_deliver`, `_confirmed`,
// `_ended`, …), never by assigning its fields or reaching into its private
// ones. Checked on the source of switchboard.js, parsed with the
// TypeScript compiler (a devDependency). No server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import ts from 'typescript';

import { RealtimeClient, Subscription } from '../switchboard.js';

const JS = fileURLToPath(new URL('../switchboard.js', import.meta.url));
const file = ts.createSourceFile(JS, readFileSync(JS, 'utf8'), ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);

/** A Subscription's own fields (public and private), from a real one. */
const fields = new Set(Object.keys(new Subscription(new RealtimeClient('ws://127.0.0.1:9/ws'), 'x', undefined)));

const ASSIGNMENTS = new Set([
  ts.SyntaxKind.EqualsToken,
  ts.SyntaxKind.PlusEqualsToken,
  ts.SyntaxKind.MinusEqualsToken,
  ts.SyntaxKind.QuestionQuestionEqualsToken,
  ts.SyntaxKind.BarBarEqualsToken,
  ts.SyntaxKind.AmpersandAmpersandEqualsToken,
]);

/** `x.field` (x not `this`) with `field` one of a Subscription's fields, or null. */
function foreignField(node) {
  if (!ts.isPropertyAccessExpression(node)) return null;
  if (node.expression.kind === ts.SyntaxKind.ThisKeyword) return null;
  return fields.has(node.name.text) ? node.name.text : null;
}

const where = (node) => {
  const { line } = file.getLineAndCharacterOfPosition(node.getStart());
  return `switchboard.js:${line + 1}: ${node.getText()}`;
};

function findings() {
  const writes = [];
  const privateReads = [];
  function visit(node, inClient) {
    if (ts.isClassDeclaration(node)) inClient = node.name?.text === 'RealtimeClient';
    if (inClient) {
      let target = null;
      if (ts.isBinaryExpression(node) && ASSIGNMENTS.has(node.operatorToken.kind)) target = node.left;
      else if (ts.isDeleteExpression(node)) target = node.expression;
      else if (
        (ts.isPrefixUnaryExpression(node) || ts.isPostfixUnaryExpression(node)) &&
        [ts.SyntaxKind.PlusPlusToken, ts.SyntaxKind.MinusMinusToken].includes(node.operator)
      ) {
        target = node.operand;
      }
      if (target && foreignField(target)) writes.push(where(node));
      const field = foreignField(node);
      if (field && field.startsWith('_')) privateReads.push(where(node));
    }
    ts.forEachChild(node, (child) => visit(child, inClient));
  }
  visit(file, false);
  return { writes, privateReads };
}

test('RealtimeClient assigns no field of a Subscription', () => {
  assert.ok(fields.has('state') && fields.has('offset'), 'the fields were found');
  assert.deepEqual(findings().writes, [], 'give Subscription a method for it and call that');
});

test("RealtimeClient reads no private field of a Subscription", () => {
  assert.deepEqual(findings().privateReads, [], 'give Subscription a method for it and call that');
});
