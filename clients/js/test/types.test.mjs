// switchboard.d.ts against switchboard.js: the hand-written declarations
// must describe the module that really runs. The TypeScript compiler API
// reads the d.ts (every exported class with its members, inherited ones
// included, every exported function, the options, the events, the client's
// error codes); the real module is imported and its classes instantiated,
// and its source is parsed for what only the source shows (parameter
// counts, the event names and error codes it uses). Each test checks both
// ways: what the d.ts declares exists, and what the JS makes public is
// declared. "Public" is every name that does not start with `_`.
//
// Also: the server error codes the d.ts names are those of docs/protocol.md.
//
// Needs `npm ci` in clients/js (typescript is a devDependency). No server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import ts from 'typescript';

import * as real from '../switchboard.js';

const DTS = fileURLToPath(new URL('../switchboard.d.ts', import.meta.url));
const JS = fileURLToPath(new URL('../switchboard.js', import.meta.url));
const PROTOCOL = fileURLToPath(new URL('../../../docs/protocol.md', import.meta.url));

// ------------------------------------------------------------ the d.ts

const program = ts.createProgram([DTS], {
  strict: true,
  noEmit: true,
  target: ts.ScriptTarget.ES2022,
  module: ts.ModuleKind.NodeNext,
  moduleResolution: ts.ModuleResolutionKind.NodeNext,
  lib: ['lib.es2022.d.ts', 'lib.dom.d.ts'],
  types: [],
});
const checker = program.getTypeChecker();
const dtsFile = program.getSourceFile(DTS);
const declared = new Map(
  checker.getExportsOfModule(checker.getSymbolAtLocation(dtsFile)).map((s) => [s.name, s]),
);

/** The symbol an export stands for (through `export default X`). */
function resolve(symbol) {
  return symbol.flags & ts.SymbolFlags.Alias ? checker.getAliasedSymbol(symbol) : symbol;
}

const isValue = (symbol) => (resolve(symbol).flags & ts.SymbolFlags.Value) !== 0;
const isClass = (symbol) => (resolve(symbol).flags & ts.SymbolFlags.Class) !== 0;

/** Most parameters any of `signatures` takes. */
const arity = (signatures) => Math.max(0, ...signatures.map((s) => s.getParameters().length));

/**
 * The members of a declared type (inherited ones included): name →
 * {method, optional, readonly, callable, params}.
 */
function membersOf(type) {
  const members = new Map();
  for (const p of checker.getPropertiesOfType(type)) {
    const decl = p.valueDeclaration ?? p.declarations?.[0];
    const method = decl !== undefined && (ts.isMethodDeclaration(decl) || ts.isMethodSignature(decl));
    const propType = checker.getTypeOfSymbol(p);
    const modifiers = decl && ts.canHaveModifiers(decl) ? (ts.getModifiers(decl) ?? []) : [];
    members.set(p.name, {
      method,
      optional: (p.flags & ts.SymbolFlags.Optional) !== 0,
      readonly:
        modifiers.some((m) => m.kind === ts.SyntaxKind.ReadonlyKeyword) ||
        (decl !== undefined && ts.isGetAccessorDeclaration(decl)),
      callable: propType.getCallSignatures().length > 0,
      params: arity(propType.getCallSignatures()),
    });
  }
  return members;
}

/** The property names of an exported interface or type alias. */
function keysOf(name) {
  const symbol = declared.get(name);
  assert.ok(symbol, `switchboard.d.ts exports ${name}`);
  return checker
    .getPropertiesOfType(checker.getDeclaredTypeOfSymbol(resolve(symbol)))
    .map((p) => p.name)
    .sort();
}

/** The string literals of an exported union type alias. */
function literalsOf(name) {
  const symbol = declared.get(name);
  assert.ok(symbol, `switchboard.d.ts exports ${name}`);
  const type = checker.getDeclaredTypeOfSymbol(resolve(symbol));
  return (type.isUnion() ? type.types : [type]).filter((t) => t.isStringLiteral()).map((t) => t.value).sort();
}

// ------------------------------------------------------------ the JS source

const jsFile = ts.createSourceFile(JS, readFileSync(JS, 'utf8'), ts.ScriptTarget.Latest, true, ts.ScriptKind.JS);

/**
 * Per class of the source: its parameter counts (`constructor` and every
 * method or accessor) and its base class; every top-level function's
 * parameter count; the event names emitted with a literal (`this._emit('x')`
 * on the class it is in, `sub._emit('x')` on a Subscription); and every
 * literal error code the client makes (`new SwitchboardError('code', …)`,
 * `this._rejectPending('code', …)`).
 */
const source = { classes: new Map(), functions: new Map(), errorCodes: new Set(), emits: [] };
function walk(node, owner) {
  if (ts.isClassDeclaration(node) && node.name) {
    const heritage = node.heritageClauses?.[0]?.types[0]?.expression;
    const info = { base: heritage ? heritage.getText() : null, params: new Map() };
    for (const m of node.members) {
      if (ts.isConstructorDeclaration(m)) info.params.set('constructor', m.parameters.length);
      else if ((ts.isMethodDeclaration(m) || ts.isGetAccessorDeclaration(m)) && m.name) {
        info.params.set(m.name.getText(), m.parameters.length);
      }
    }
    source.classes.set(node.name.text, info);
    owner = node.name.text;
  } else if (ts.isFunctionDeclaration(node) && node.name) {
    source.functions.set(node.name.text, node.parameters.length);
  } else if (
    (ts.isNewExpression(node) && node.expression.getText() === 'SwitchboardError') ||
    (ts.isCallExpression(node) && node.expression.getText() === 'this._rejectPending')
  ) {
    // `new SwitchboardError(code, …)`, and `_rejectPending(code, …)`, which makes them.
    const code = node.arguments?.[0];
    if (code && ts.isStringLiteralLike(code)) source.errorCodes.add(code.text);
  } else if (
    ts.isCallExpression(node) &&
    ts.isPropertyAccessExpression(node.expression) &&
    node.expression.name.text === '_emit' &&
    node.arguments[0] &&
    ts.isStringLiteralLike(node.arguments[0])
  ) {
    // `this._emit` in a class emits on that class; `sub._emit` on a Subscription.
    const receiver = node.expression.expression.getText();
    const emitter = receiver === 'this' ? owner : receiver === 'sub' ? 'Subscription' : receiver;
    source.emits.push({ emitter, event: node.arguments[0].text });
  }
  ts.forEachChild(node, (child) => walk(child, owner));
}
walk(jsFile, null);

/** The JS parameter count of `name` on class `cls` or its bases. */
function sourceParams(cls, name) {
  for (let c = source.classes.get(cls); c; c = source.classes.get(c.base)) {
    if (c.params.has(name)) return c.params.get(name);
  }
  return undefined;
}

// ------------------------------------------------------------ the real module

/**
 * One instance of each exported class, made as an app (or the client) makes
 * it, with every optional field present where that is possible. A class the
 * d.ts exports with no entry here fails the test: add one.
 */
const client = new real.RealtimeClient('ws://127.0.0.1:9/ws');
const INSTANCES = {
  RealtimeClient: client,
  Subscription: new real.Subscription(client, 'types:check', { epoch: 'e', offset: 1 }),
  SwitchboardError: new real.SwitchboardError('timeout', 'no reply', {
    type: 'error',
    code: 'timeout',
    message: 'no reply',
    ref: 1,
  }),
};

/** Where the runtime stops looking for inherited members. */
const ROOTS = new Set([Object.prototype, Error.prototype, Function.prototype]);

/** Every public member name of `obj`: own and inherited (up to a root). */
function runtimeMembers(obj) {
  const names = new Set();
  for (let o = obj; o && !ROOTS.has(o); o = Object.getPrototypeOf(o)) {
    for (const n of Object.getOwnPropertyNames(o)) {
      if (n !== 'constructor' && !n.startsWith('_')) names.add(n);
    }
  }
  return names;
}

/** The property descriptor of `name` on `obj` or its prototype chain. */
function descriptor(obj, name) {
  for (let o = obj; o; o = Object.getPrototypeOf(o)) {
    const d = Object.getOwnPropertyDescriptor(o, name);
    if (d) return d;
  }
  return undefined;
}

const declaredValues = [...declared.values()].filter(isValue);
const declaredClasses = declaredValues.filter(isClass);

// ------------------------------------------------------------ the tests

test('the module exports exactly the values the d.ts declares', () => {
  const runtime = Object.keys(real).sort();
  const typed = declaredValues.map((s) => s.name).sort();
  assert.deepEqual(runtime, typed, 'runtime exports (left) vs d.ts value exports (right)');
  for (const symbol of declaredValues) {
    const target = resolve(symbol);
    if (target !== symbol) {
      // `export default X`: the same value as the export X.
      assert.equal(real[symbol.name], real[target.name], `export ${symbol.name} is ${target.name}`);
    }
    const expected = target.flags & (ts.SymbolFlags.Class | ts.SymbolFlags.Function) ? 'function' : undefined;
    if (expected) assert.equal(typeof real[symbol.name], expected, `export ${symbol.name} is a ${expected}`);
  }
});

test('every exported function takes the parameters the d.ts declares', () => {
  for (const symbol of declaredValues) {
    const target = resolve(symbol);
    if (!(target.flags & ts.SymbolFlags.Function)) continue;
    const typed = arity(checker.getTypeOfSymbol(target).getCallSignatures());
    assert.equal(source.functions.get(target.name), typed, `${target.name}: parameters in the JS vs the d.ts`);
  }
});

for (const symbol of declaredClasses) {
  const cls = resolve(symbol);
  if (cls !== symbol) continue; // the default export, checked as its target
  const name = cls.name;

  test(`class ${name}: every declared member exists, as declared`, () => {
    const instance = INSTANCES[name];
    assert.ok(instance, `no instance of ${name} in INSTANCES (types.test.mjs): add one`);
    assert.ok(instance instanceof real[name], `INSTANCES.${name} is a ${name}`);
    const members = membersOf(checker.getDeclaredTypeOfSymbol(cls));
    for (const [member, m] of members) {
      const where = `${name}#${member}`;
      if (!(member in instance)) {
        assert.ok(m.optional, `${where} is declared but missing at runtime`);
        continue;
      }
      const value = instance[member];
      if (m.method || m.callable) {
        assert.equal(typeof value, 'function', `${where} is declared as a method`);
      } else {
        assert.notEqual(typeof value, 'function', `${where} is declared as a property, but is a method`);
      }
      if (m.method) {
        const params = sourceParams(name, member);
        // Methods inherited from Error/Object have no source here.
        if (params !== undefined) assert.equal(params, m.params, `${where}: parameters in the JS vs the d.ts`);
      }
      if (!m.method && !m.readonly) {
        const d = descriptor(instance, member);
        assert.ok(d && (d.writable || d.set), `${where} is declared writable but cannot be assigned`);
      }
    }
  });

  test(`class ${name}: every public runtime member is declared`, () => {
    const instance = INSTANCES[name];
    assert.ok(instance, `no instance of ${name} in INSTANCES (types.test.mjs): add one`);
    const members = membersOf(checker.getDeclaredTypeOfSymbol(cls));
    const missing = [...runtimeMembers(instance)].filter((m) => !members.has(m));
    assert.deepEqual(missing, [], `public members of ${name} that switchboard.d.ts does not declare`);
  });

  test(`class ${name}: constructor and static members match`, () => {
    const staticType = checker.getTypeOfSymbol(cls);
    const typed = arity(staticType.getConstructSignatures());
    assert.equal(sourceParams(name, 'constructor') ?? 0, typed, `new ${name}(…): parameters in the JS vs the d.ts`);
    const declaredStatics = checker
      .getPropertiesOfType(staticType)
      .map((p) => p.name)
      .filter((n) => n !== 'prototype')
      .sort();
    const runtimeStatics = Object.getOwnPropertyNames(real[name])
      .filter((n) => !['length', 'name', 'prototype'].includes(n) && !n.startsWith('_'))
      .sort();
    assert.deepEqual(runtimeStatics, declaredStatics, `static members of ${name}: runtime (left) vs d.ts (right)`);
  });
}

test('RealtimeClientOptions names exactly the options the client has', () => {
  assert.deepEqual(Object.keys(client.options).sort(), keysOf('RealtimeClientOptions'));
});

test("the client's own error codes are ClientErrorCode", () => {
  assert.deepEqual([...source.errorCodes].sort(), literalsOf('ClientErrorCode'));
});

test('every event the JS emits by name is declared, and every declared event is emitted', () => {
  // Besides these, the client emits every server frame under its `type`
  // (FrameMap), and hands a channel's `join`/`leave` frames to its
  // subscription: both are emitted with a computed name.
  const computed = { RealtimeClient: keysOf('FrameMap'), Subscription: ['join', 'leave'] };
  const maps = { RealtimeClient: 'ClientEventMap', Subscription: 'SubscriptionEventMap' };
  for (const [emitter, mapName] of Object.entries(maps)) {
    const typed = keysOf(mapName);
    const emitted = [...new Set(source.emits.filter((e) => e.emitter === emitter).map((e) => e.event))].sort();
    const undeclared = emitted.filter((e) => !typed.includes(e) && !computed[emitter].includes(e));
    assert.deepEqual(undeclared, [], `${emitter} emits events that ${mapName} does not declare`);
    const never = typed.filter((e) => !emitted.includes(e) && !computed[emitter].includes(e));
    assert.deepEqual(never, [], `${mapName} declares events that ${emitter} never emits`);
  }
  const strays = source.emits.filter((e) => !(e.emitter in maps));
  assert.deepEqual(strays, [], 'events emitted on an object this test does not know');
});

test('ServerErrorCode lists exactly the error codes of docs/protocol.md', () => {
  // The rows of the table under "## Errors": | `code` | when |
  const doc = readFileSync(PROTOCOL, 'utf8');
  const section = doc.split(/^## /m).find((s) => s.startsWith('Errors'));
  assert.ok(section, 'docs/protocol.md has an "## Errors" section');
  const documented = [...section.matchAll(/^\| `([a-z_]+)` \|/gm)].map((m) => m[1]).sort();
  assert.ok(documented.length > 0, 'the Errors section has a table of codes');
  assert.deepEqual(literalsOf('ServerErrorCode'), documented, 'switchboard.d.ts (left) vs docs/protocol.md (right)');
});
