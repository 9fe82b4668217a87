"""Telecom domain (out-of-domain, test only): Volta Mobile, an invented phone carrier's help desk.

Its tools, policy and vocabulary differ from the two training domains, as the ALMITA help-desk
set does in the paper.  Database: one account per conversation (plan, bill, data left, line
status).  Policy rules: verify phone number + PIN first, plan changes only with nothing due,
data top-ups $5 per GB and not on the unlimited plan, payments up to the amount due, confirm
before any write.
"""

from __future__ import annotations

import random
from typing import Any

from data.synthetic.world import (
    NUMBER, STRING, Db, Dialogue, Domain, Tool, ToolResult, confirm_write, converse, enum, error, money, params,
    replace_record, sentences, listing,
)
from data.synthetic.retail_tools import FIRST_NAMES, LAST_NAMES

POLICY = (
    "You are the help desk of Volta Mobile. Verify the caller by phone number and PIN before any "
    "account action. Ask for missing details. A plan can change only when nothing is due. Data "
    "top-ups cost $5 per GB and are not sold on the unlimited plan. A payment cannot exceed the "
    "amount due. Before a payment or change, state it and wait for an explicit yes. Outage checks "
    "and plan prices need no verification."
)

PLANS: dict[str, tuple[float, str]] = {"basic": (25.0, "5 GB"), "plus": (40.0, "20 GB"), "unlimited": (60.0, "unlimited")}
DATA_PRICE = 5


def make_db(rng: random.Random) -> Db:
    """One account; its bill is paid (nothing due) about a third of the time."""
    account_id = f"A{rng.randint(1000, 9999)}"
    plan = rng.choice(sorted(PLANS))
    due = 0.0 if rng.random() < 0.35 else round(PLANS[plan][0] + rng.choice((0, 0, 4.5, 12.0, 7.25)), 2)
    account = {
        "account_id": account_id, "first_name": rng.choice(FIRST_NAMES), "last_name": rng.choice(LAST_NAMES),
        "phone": f"555-{rng.randint(1000, 9999)}", "pin": f"{rng.randint(0, 9999):04d}", "plan": plan,
        "amount_due": due, "due_in_days": rng.randint(2, 20), "previous_bill": round(PLANS[plan][0] + rng.choice((0, 3.5, 9.0)), 2),
        "data_left_gb": 0.0 if plan == "unlimited" else round(rng.uniform(0, 4), 1), "line": "active",
        "zip": f"{rng.randint(10000, 99999)}",
    }
    outages = {account["zip"]: {"zip": account["zip"], "outage": rng.random() < 0.3, "eta_hours": rng.randint(1, 12)}}
    return {"accounts": {account_id: account}, "outages": outages}


# ----------------------------------------------------------------------------- tools


def verify_account(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    for account in db["accounts"].values():
        if account["phone"] == args["phone"].strip() and account["pin"] == args["pin"].strip():
            return {"account_id": account["account_id"]}, db
    return error("phone number and PIN do not match"), db


def get_account(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    account = db["accounts"].get(args["account_id"])
    if account is None:
        return error(f"account {args['account_id']} not found"), db
    return {key: account[key] for key in ("account_id", "plan", "data_left_gb", "line")}, db


def get_bill(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    account = db["accounts"].get(args["account_id"])
    if account is None:
        return error(f"account {args['account_id']} not found"), db
    if args.get("month", "current") == "previous":
        return {"month": "previous", "amount": account["previous_bill"], "paid": True}, db
    return {"month": "current", "amount_due": account["amount_due"], "due_in_days": account["due_in_days"]}, db


def pay_bill(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    account = db["accounts"].get(args["account_id"])
    if account is None:
        return error(f"account {args['account_id']} not found"), db
    if not 0 < args["amount"] <= account["amount_due"]:
        return error(f"amount must be between 0 and the {account['amount_due']} due"), db
    remaining = round(account["amount_due"] - args["amount"], 2)
    updated = {**account, "amount_due": remaining}
    return ({"paid": args["amount"], "method": args["method"], "amount_due": remaining},
            replace_record(db, "accounts", account["account_id"], updated))


def list_plans(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    return {"plans": [{"plan": name, "price": price, "data": data} for name, (price, data) in PLANS.items()]}, db


def change_plan(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    account = db["accounts"].get(args["account_id"])
    if account is None:
        return error(f"account {args['account_id']} not found"), db
    if account["amount_due"] > 0:
        return error("pay the amount due before changing plans"), db
    if account["plan"] == args["plan"]:
        return error(f"already on the {args['plan']} plan"), db
    updated = {**account, "plan": args["plan"]}
    return ({"plan": args["plan"], "monthly_price": PLANS[args["plan"]][0]},
            replace_record(db, "accounts", account["account_id"], updated))


def buy_data(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    account = db["accounts"].get(args["account_id"])
    if account is None:
        return error(f"account {args['account_id']} not found"), db
    if account["plan"] == "unlimited":
        return error("the unlimited plan needs no top-ups"), db
    price = DATA_PRICE * args["gb"]
    updated = {**account, "data_left_gb": round(account["data_left_gb"] + args["gb"], 1),
               "amount_due": round(account["amount_due"] + price, 2)}
    return ({"added_gb": args["gb"], "data_left_gb": updated["data_left_gb"], "charge": price},
            replace_record(db, "accounts", account["account_id"], updated))


def suspend_line(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    account = db["accounts"].get(args["account_id"])
    if account is None:
        return error(f"account {args['account_id']} not found"), db
    if account["line"] == "suspended":
        return error("the line is already suspended"), db
    updated = {**account, "line": "suspended"}
    return ({"line": "suspended", "reason": args["reason"]},
            replace_record(db, "accounts", account["account_id"], updated))


def check_outage(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    known = db["outages"].get(args["zip"])
    return (dict(known) if known else {"zip": args["zip"], "outage": False, "eta_hours": 0}), db


TOOLS = (
    Tool("verify_account", "Verify a caller.", params({"phone": STRING, "pin": STRING}),
         verify_account, auth_key="account_id"),
    Tool("get_account", "Get account details.", params({"account_id": STRING}),
         get_account),
    Tool("get_bill", "Get a bill.", params({"account_id": STRING},
                                                                  {"month": enum("current", "previous")}), get_bill),
    Tool("pay_bill", "Pay a bill.",
         params({"account_id": STRING, "amount": NUMBER, "method": enum("card", "bank")}), pay_bill, writes=True),
    Tool("list_plans", "List plans with prices.", params({}), list_plans, public=True),
    Tool("change_plan", "Change the plan.",
         params({"account_id": STRING, "plan": enum(*PLANS)}), change_plan, writes=True),
    Tool("buy_data", "Buy extra data.", params({"account_id": STRING, "gb": {"type": "integer", "enum": [1, 5, 10]}}),
         buy_data, writes=True),
    Tool("suspend_line", "Suspend a line.",
         params({"account_id": STRING, "reason": enum("lost", "stolen")}), suspend_line, writes=True),
    Tool("check_outage", "Check for an outage.", params({"zip": STRING}), check_outage,
         public=True),
)


# ----------------------------------------------------------------------------- conversations


class TelecomChat:
    """Scripts one help-desk conversation about the database's single account."""

    def __init__(self, dlg: Dialogue) -> None:
        self.dlg = dlg
        self.rng = dlg.rng
        self.account = next(iter(dlg.db["accounts"].values()))
        self.upfront_auth = self.rng.random() < 0.65

    @property
    def current(self) -> dict[str, Any]:
        return self.dlg.db["accounts"][self.account["account_id"]]

    def auth_sentence(self) -> str:
        return self.dlg.pick(("My number is {phone} and my PIN is {pin}.", "PIN {pin}, phone {phone}.",
                              "Phone {phone}, PIN {pin}.", "It's {phone}, PIN {pin}."),
                             phone=self.account["phone"], pin=self.account["pin"])

    def open_request(self, first: bool, request: str, goal: str) -> None:
        dlg = self.dlg
        if dlg.authenticated is not None:
            dlg.user(request)
            return
        if first and self.upfront_auth:
            dlg.user(sentences(dlg, [request, self.auth_sentence()]))
        else:
            dlg.user(request)
            dlg.say(dlg.pick(("I can help. Please give me your phone number and PIN first.",
                              "Sure. What are your phone number and PIN?")),
                    f"The caller wants to {goal} but is not verified. The policy requires phone number and PIN "
                    "first, so I ask for them.")
            dlg.user(self.auth_sentence())
        dlg.call("verify_account", {"phone": self.account["phone"], "pin": self.account["pin"]},
                 f"The caller gave phone {self.account['phone']} and a PIN. I must verify before any account "
                 "action, so I call verify_account.")

    def bill(self, dlg: Dialogue, first: bool) -> None:
        previous = self.rng.random() < 0.3
        request = (dlg.pick(("How much was my last bill?", "What did I pay last month?")) if previous else
                   dlg.pick(("How much do I owe?", "What's my current bill?", "When is my bill due?")))
        self.open_request(first, request, "know their bill")
        arguments: dict[str, Any] = {"account_id": dlg.authenticated}
        if previous:
            arguments["month"] = "previous"
        result = dlg.call("get_bill", arguments,
                          f"The caller is verified as {dlg.authenticated} and asks about the "
                          f"{'previous' if previous else 'current'} bill, so I call get_bill.")
        if previous:
            dlg.say(dlg.pick(("Your previous bill was {amount}, and it is paid.", "Last month's bill: {amount}, paid."),
                             amount=money(result["amount"])),
                    f"get_bill shows the previous bill was {money(result['amount'])}, paid. I answer.")
        else:
            dlg.say(dlg.pick(("You owe {amount}, due in {days} days.", "Your current balance is {amount}, due in {days} days."),
                             amount=money(result["amount_due"]), days=result["due_in_days"]),
                    f"get_bill shows {money(result['amount_due'])} due in {result['due_in_days']} days. I answer.")

    def pay(self, dlg: Dialogue, first: bool) -> None:
        full = self.rng.random() < 0.6
        due = self.current["amount_due"]
        amount = due if full else float(self.rng.choice((10, 20, 30, 50)))
        method = self.rng.choice(("card", "bank"))
        say_method = self.rng.random() < 0.6
        request = (dlg.pick(("I want to pay my bill in full.", "Please pay everything I owe.")) if full else
                   dlg.pick(("I'd like to pay ${amount:g} toward my bill.", "Can I pay ${amount:g} now?"), amount=amount))
        if say_method:
            request += " " + dlg.pick(("By {method}.", "Use my {method}.", "I'll pay by {method}."), method=method)
        self.open_request(first, request, "pay their bill")
        result = dlg.call("get_bill", {"account_id": dlg.authenticated},
                          f"The caller is verified as {dlg.authenticated} and wants to pay. I call get_bill to see "
                          "the amount due.")
        due = result["amount_due"]
        if due == 0 or amount > due:
            why = "nothing is due" if due == 0 else f"{money(amount)} is more than the {money(due)} due"
            dlg.say(dlg.pick(("I can't take that payment: {why}.", "No payment needed or possible: {why}."), why=why),
                    f"get_bill shows {money(due)} due. {why[0].upper() + why[1:]}, so the policy forbids this "
                    "payment and I do not call pay_bill.")
            return
        if not say_method:
            dlg.say(dlg.pick(("You owe {due}. Will you pay by card or bank?", "Would you like to pay by card or bank?"),
                             due=money(due)),
                    "pay_bill needs a payment method and the caller gave none, so I ask for it.")
            dlg.user(dlg.pick(("{method}.", "By {method}.", "{method}, please."), method=method).capitalize())
        remaining = round(due - amount, 2)
        confirm_write(dlg, 
            dlg.pick(("I'll charge {amount} to your {method}; {remaining} will remain due. Confirm?",
                      "Paying {amount} by {method} leaves {remaining} due. Shall I proceed?"),
                     amount=money(amount), method=method, remaining=money(remaining)),
            f"{money(due)} is due and the caller pays {money(amount)}, so {money(due)} - {money(amount)} = "
            f"{money(remaining)} remains. I need a yes before calling pay_bill.",
            ("pay_bill", {"account_id": dlg.authenticated, "amount": amount, "method": method}),
            f"The caller confirmed. I call pay_bill for {money(amount)} by {method}.",
            lambda res: (dlg.pick(("Payment of {paid} received. You now owe {due}.", "Done: {paid} paid, {due} left."),
                                  paid=money(res["paid"]), due=money(res["amount_due"])),
                         f"pay_bill succeeded; {money(res['amount_due'])} remains. I report it."),
            dlg.pick(("Okay, no payment was made.", "Alright, I won't charge anything.")))

    def change(self, dlg: Dialogue, first: bool) -> None:
        plan = self.rng.choice(sorted(set(PLANS) - {self.current["plan"]}))
        price, data = PLANS[plan]
        request = dlg.pick(("I want to switch to the {plan} plan.", "Can you move me to {plan}?",
                            "Please change my plan to {plan}."), plan=plan)
        self.open_request(first, request, "change plan")
        account = dlg.call("get_account", {"account_id": dlg.authenticated},
                           f"The caller is verified as {dlg.authenticated} and wants the {plan} plan. I call "
                           "get_account to see the current plan.")
        if account["plan"] == plan:
            dlg.say(dlg.pick(("You're already on the {plan} plan.", "Your plan is already {plan}; nothing to change."),
                             plan=plan),
                    f"get_account shows the plan is already {plan}, so there is nothing to change.")
            return
        result = dlg.call("get_bill", {"account_id": dlg.authenticated},
                          f"The current plan is {account['plan']}. Plans change only with nothing due, so I call "
                          "get_bill to check the balance.")
        if result["amount_due"] > 0:
            dlg.say(dlg.pick(("You have {due} due, so I can't change the plan until it's paid.",
                              "Plan changes need a zero balance, and you owe {due}."), due=money(result["amount_due"])),
                    f"get_bill shows {money(result['amount_due'])} due. The policy allows plan changes only when "
                    "nothing is due, so I refuse and do not call change_plan.")
            return
        confirm_write(dlg, 
            dlg.pick(("The {plan} plan costs {price} a month with {data} data. Shall I switch you?",
                      "Switching to {plan}: {price}/month, {data} data. Confirm?"),
                     plan=plan, price=money(price), data=data),
            f"Nothing is due, so the plan can change. {plan} costs {money(price)} per month. I ask for a yes before "
            "change_plan.",
            ("change_plan", {"account_id": dlg.authenticated, "plan": plan}),
            f"The caller confirmed. I call change_plan to {plan}.",
            lambda res: (dlg.pick(("You're now on the {plan} plan at {price} a month.", "Done, plan changed to {plan}."),
                                  plan=res["plan"], price=money(res["monthly_price"])),
                         f"change_plan succeeded: {res['plan']}. I confirm."),
            dlg.pick(("Okay, your plan stays the same.", "No change made.")))

    def data(self, dlg: Dialogue, first: bool) -> None:
        gb = self.rng.choice((1, 5, 10))
        request = dlg.pick(("I need {gb} GB more data.", "Can I buy {gb} GB of data?", "Add {gb} GB to my line, please."),
                           gb=gb)
        self.open_request(first, request, "buy data")
        result = dlg.call("get_account", {"account_id": dlg.authenticated},
                          f"The caller is verified as {dlg.authenticated}. Top-ups are not sold on unlimited, so I "
                          "call get_account to check the plan.")
        if result["plan"] == "unlimited":
            dlg.say(dlg.pick(("You're on the unlimited plan, so you don't need extra data.",
                              "No top-up needed: your plan is unlimited.")),
                    "get_account shows the unlimited plan. Top-ups are not sold on it, so I do not call buy_data.")
            return
        price = DATA_PRICE * gb
        confirm_write(dlg, 
            dlg.pick(("{gb} GB costs {price}, added to your bill. Go ahead?", "I can add {gb} GB for {price}. Confirm?"),
                     gb=gb, price=money(price)),
            f"The plan is {result['plan']}, so a top-up is allowed: {gb} x {money(DATA_PRICE)} = {money(price)}. "
            "I need a yes before buy_data.",
            ("buy_data", {"account_id": dlg.authenticated, "gb": gb}),
            f"The caller confirmed. I call buy_data for {gb} GB.",
            lambda res: (dlg.pick(("Added {gb} GB; you now have {left} GB. {price} was added to your bill.",
                                   "Done: {left} GB available now, {price} charged."),
                                  gb=res["added_gb"], left=res["data_left_gb"], price=money(res["charge"])),
                         f"buy_data succeeded: {res['data_left_gb']} GB left, {money(res['charge'])} charged."),
            dlg.pick(("Okay, no data added.", "Alright, nothing was bought.")))

    def lost(self, dlg: Dialogue, first: bool) -> None:
        reason = self.rng.choice(("lost", "stolen"))
        request = dlg.pick(("My phone was {reason}, please block the line.", "I {verb} my phone. Can you suspend my line?"),
                           reason=reason, verb="lost" if reason == "lost" else "had stolen")
        self.open_request(first, request, "suspend a line")
        account = dlg.call("get_account", {"account_id": dlg.authenticated},
                           f"The caller is verified as {dlg.authenticated} and reports a {reason} phone. I call "
                           "get_account to check the line status.")
        if account["line"] == "suspended":
            dlg.say(dlg.pick(("Your line is already suspended.", "The line is suspended already; nothing to do.")),
                    "get_account shows the line is already suspended, so I do not call suspend_line.")
            return
        confirm_write(dlg, 
            dlg.pick(("I'll suspend the line for phone {phone} as {reason}. Confirm?",
                      "Suspending {phone} stops all calls and data. Shall I do it?"),
                     phone=self.account["phone"], reason=reason),
            f"The caller is verified and reports the phone {reason}. Suspending is a change, so I ask for a yes "
            "before suspend_line.",
            ("suspend_line", {"account_id": dlg.authenticated, "reason": reason}),
            f"The caller confirmed. I call suspend_line with the reason '{reason}'.",
            lambda res: (dlg.pick(("Your line is suspended.", "Done, the line {phone} is now suspended."),
                                  phone=self.account["phone"]),
                         "suspend_line succeeded. I confirm the line is suspended."),
            dlg.pick(("Okay, the line stays active.", "Alright, I won't suspend it.")))

    def usage(self, dlg: Dialogue, first: bool) -> None:
        request = dlg.pick(("How much data do I have left?", "What plan am I on?", "Is my line active?"))
        self.open_request(first, request, "check their account")
        result = dlg.call("get_account", {"account_id": dlg.authenticated},
                          f"The caller is verified as {dlg.authenticated} and asks about the account, so I call "
                          "get_account.")
        data = "unlimited data" if result["plan"] == "unlimited" else f"{result['data_left_gb']} GB left"
        dlg.say(dlg.pick(("You're on the {plan} plan with {data}; your line is {line}.",
                          "Plan: {plan}. Data: {data}. Line: {line}."), plan=result["plan"], data=data, line=result["line"]),
                f"get_account shows plan {result['plan']}, {data}, line {result['line']}. I answer.")

    def outage(self, dlg: Dialogue, first: bool) -> None:
        zip_code = self.account["zip"]
        dlg.user(dlg.pick(("Is there an outage in {zip}?", "My signal is gone. Any outage at zip {zip}?",
                           "Network down in {zip}?"), zip=zip_code))
        result = dlg.call("check_outage", {"zip": zip_code},
                          f"The caller asks about an outage in {zip_code}. Outage checks need no verification, so I "
                          "call check_outage.")
        if result["outage"]:
            text = dlg.pick(("Yes, there is an outage in {zip}; service should be back in about {eta} hours.",
                             "There's a known outage in {zip}, fixed in about {eta} hours."), zip=zip_code,
                            eta=result["eta_hours"])
        else:
            text = dlg.pick(("No outage is reported in {zip}. Try restarting your phone.",
                             "The network in {zip} is fine."), zip=zip_code)
        dlg.say(text, f"check_outage says outage={result['outage']} for {zip_code}. I tell the caller.")

    def plans(self, dlg: Dialogue, first: bool) -> None:
        dlg.user(dlg.pick(("What plans do you offer?", "How much do your plans cost?")))
        result = dlg.call("list_plans", {}, "The caller asks about plans. Plan prices need no verification, so I call "
                                            "list_plans.")
        offers = listing([f"{plan['plan']} at {money(plan['price'])} ({plan['data']})" for plan in result["plans"]])
        dlg.say(dlg.pick(("We offer {offers}.", "Our plans: {offers}."), offers=offers),
                "list_plans returned the three plans. I list them with prices.")

    def refuse(self, dlg: Dialogue, first: bool) -> None:
        request, reason = self.rng.choice((
            ("Can you waive my late fee?", "I can't waive fees"),
            ("Can you unlock my phone for another carrier?", "I can't unlock phones here"),
            ("Give me free data this month?", "I can't give free data")))
        dlg.user(request)
        dlg.say(dlg.pick(("Sorry, {reason}.", "I'm afraid {reason}; it's against our policy."), reason=reason),
                f"The caller asks for something the policy does not allow ({reason}), so I refuse politely.")


def script(dlg: Dialogue) -> None:
    chat = TelecomChat(dlg)
    openers = [(chat.bill, 2), (chat.pay, 2.5), (chat.change, 2), (chat.data, 2), (chat.lost, 1), (chat.usage, 1.5),
               (chat.outage, 1), (chat.plans, 1)]
    followups = openers + [(chat.refuse, 1.5)]
    converse(dlg, openers, followups)


TELECOM = Domain("telecom", POLICY, TOOLS, make_db, script)
